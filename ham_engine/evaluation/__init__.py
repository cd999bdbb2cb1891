"""``ham eval``: reproduce the paper's table (docs/evaluation.md) on a content × style benchmark.

One module per step: :mod:`.pairs` (which pairs), :mod:`.runner` (HAM over them,
resumable), :mod:`.weights` (where each metric's published weights are looked for),
:mod:`.inception` and :mod:`.networks` (the CNNs, written out so published state dicts
load without torchvision), :mod:`.metrics` (the arithmetic), :mod:`.suite` (metrics over
a run), :mod:`.record` (reproducibility), :mod:`.report` (metrics.json, table, contact
sheet), :mod:`.paper` (the paper's numbers) and :mod:`.cli` (the sub-command).

Importing this package (and :mod:`.cli`) does not import torch; docs/evaluation.md
defines each metric and says which weights go where.
"""
