"""Reshard, train, evaluate: a uid subset taken to a trained CLIP model and its benchmark scores.

Two backends run the same steps (``datacomp-sieve reshard|train|evaluate|reproduce``):

- the DataComp backend (``--datacomp DIR``, a user's clone of mlfoundations/datacomp, run with
  DataComp's own interpreter ``--datacomp_python``): ``datacomp.py`` builds DataComp's exact
  command lines, runs them from the clone, streams their logs and checks their outputs;
- the native backend (no clone; what CI runs): ``reshard.py`` (DataComp's resharder contract),
  ``train.py`` (open_clip_train's main with DataComp's scale table, plus a ``toy`` scale) and
  ``evaluate.py`` (zero-shot evaluation through clip_benchmark over DataComp's evaluation sets
  or the toy tasks, and the summary in DataComp's groups).

``experiments.py`` holds the paper's experiments and published numbers as data; ``cli.py`` the
subcommands.
"""
