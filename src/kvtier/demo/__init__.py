"""``kvtier demo``: workloads (chat, document QA, long context), a with/without runner, report and plot."""
