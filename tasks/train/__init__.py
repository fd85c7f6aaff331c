"""Train step: the seed's softmax regression, data-parallel with Horovod.

Two processes, kept apart so that neither pays for the other's imports:

- the launcher side (runs in the flow's or the CLI's process; no MXNet): `step` (the step:
  checks, the run's config.json, which launch), `launcher` (starts, watches and stops rank
  processes; failure messages), `supervisor` (restarts a host's ranks from the last
  checkpoint when one dies), `store_checkpoints` (mirrors checkpoints to the artifact store
  and restores them for --resume), `rendezvous` (the only module that touches
  `horovod.runner`);
- the rank side (`python -m tasks.train.rank`, one process per rank): `rank` (the per-rank
  training loop), `model` (the network and its per-batch graph), `checkpoints`;
- pure helpers both sides use: `sharding` (global-batch semantics), `history` (epoch records).
"""
