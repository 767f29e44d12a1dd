"""QRPO's pre-computation phase, in small modules with one job each.

- `io`: read/write datasets by Hub id, `save_to_disk` folder or data file; column names.
- `chunks`: resumable, sharded processing in fixed chunks; merging shard outputs.
- `sampling`: prompts tokenised as in training, per-completion seeds, transformers and vLLM samplers.
- `generate`: reference completions (`generate_references`).
- `scoring`: reward models and reward functions (`score_dataset`).
- `offpolicy`: training rows made of the references themselves (`build_offpolicy_dataset`).
- `evaluate`: reward, KL and length of a policy's own samples (`evaluate_policy`).

The public names are re-exported by :mod:`trl_qrpo.reference`.
"""
