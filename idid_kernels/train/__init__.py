"""Real-data evaluation of the losses under class and quality imbalance (``python -m idid_kernels train``).

data (digits, long-tail subsample, degradation) -> model (small CNN) + heads (one per loss) ->
trainer (one run) -> metrics -> report (tables, JSON, CSV) / plots; runner ties them together.
"""
