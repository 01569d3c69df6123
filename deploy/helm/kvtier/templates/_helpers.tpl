{{/* "32GiB" or "2Gi" -> 32 / 2 (whole GiB), for the /dev/shm emptyDir size */}}
{{- define "kvtier.gib" -}}{{ regexReplaceAll "[^0-9]" . "" }}{{- end -}}
