"""`trl qrpo iterate --config iterate.yaml`: iterative QRPO (see `IterateConfig` and docs/iterative.md).

The YAML holds `IterateConfig`'s fields and one section per stage (`generate`, `score`, `build_offpolicy`,
`ref_logps`, `train`, `evaluate`), each with the options of the command of that name; flags override the top-level
fields (`--num_rounds 3`, `--output_dir ...`). Run the same command again to resume a run that stopped.
"""

from __future__ import annotations

import sys

_REQUIRED = ("model_name_or_path", "dataset_name", "output_dir")


def iterate_cli(argv: list[str], prog: str = "trl qrpo iterate") -> int:
    """Parse `IterateConfig` (flags and `--config`), run the rounds, print the summary table."""
    from trl import TrlParser

    from trl_qrpo.iterative import IterateConfig, StageFailed, iterative_qrpo
    from trl_qrpo.iterative.summary import markdown_table
    from trl_qrpo.loading import DatasetLoadError
    from trl_qrpo.scripts.precompute_cli import setup_logging

    parser = TrlParser((IterateConfig,), prog=prog, description=IterateConfig.__doc__)
    try:
        (config,) = parser.parse_args_and_config(args=list(argv))
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    missing = [name for name in _REQUIRED if getattr(config, name) is None]
    if missing:
        parser.error(f"missing required argument(s): {', '.join('--' + name for name in missing)}")
    setup_logging()
    try:
        summary = iterative_qrpo(config)
    except (ValueError, DatasetLoadError, StageFailed) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\n{prog}: interrupted. Finished stages are kept in {config.output_dir}: run the same command again to "
            "resume at the stage where it stopped.",
            file=sys.stderr,
        )
        return 130
    print(markdown_table(summary["policies"]), end="")
    print(f"Summary: {config.output_dir}/summary.md (and .json, .png)")
    return 0
