"""Offline jobs over files, resumable after any crash: ``label`` (DPO pairs from the judge service)
and ``score`` (reward scores of every completion). See :mod:`rlhf_train.jobs.io` for how resuming works."""
