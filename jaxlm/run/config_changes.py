"""What changed between the run config a checkpoint saved and the config that resumes from it.

A resumed run reads it for two things: the keys that change how many tokens a step sees
(`jaxlm.run.counters` logs them and counts on), and the keys the data pipeline's saved
position depends on: when the new pipeline cannot take that position, the error names them
(`data_position_error`) instead of the run starting over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from jaxlm.run.errors import CheckpointError, ConfigError, UserError

# Keys outside the `data` and `chat` sections and the stage's own sections that shape the
# data pipeline (and so its saved position).
PIPELINE_KEYS = ("stage", "train.global_batch_size")


def flat(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted key: value} of every leaf of a config (a ConfigDict or its saved dict)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(tree, "")
    return out


def changes(saved: Mapping[str, Any], config: Any, keys: Iterable[str] = (),
            prefixes: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of each of `keys` (in their order), then of each key under
    one of `prefixes` (e.g. "data."), whose value differs; keys the saved config lacks (a
    checkpoint of an older version) are skipped."""
    old, new = flat(saved), flat(config)
    keys, prefixes = tuple(keys), tuple(prefixes)
    wanted = [k for k in keys if k in new] + [
        k for k in new if k not in keys and prefixes and k.startswith(prefixes)]
    return [(k, old[k], new[k]) for k in wanted if k in old and old[k] != new[k]]


def describe(changed: Iterable[tuple[str, Any, Any]]) -> str:
    """"data.num_workers 0 -> 1, data.shuffle_rows 1024 -> 0"."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed)


def pipeline_prefixes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The sections whose keys shape the run's data pipeline: data, chat, and the sections of
    the stage (sft.*, dpo.*, rl.*, ...)."""
    from jaxlm.stages import get_stage

    return ("data.", "chat.") + tuple(f"{s.name}." for s in get_stage(config.stage).sections)


def data_position_error(saved: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                        step: int, directory: str, cause: str) -> UserError:
    """The one-line error of a checkpoint whose saved data position the run's data pipeline
    refused (`cause`): it names the data keys changed since the save (a ConfigError on the
    first), since the checkpoint itself is fine and must not be moved aside."""
    changed = changes(saved, config, PIPELINE_KEYS, pipeline_prefixes(config))
    where = f"checkpoint step {step} in {directory}"
    fix = (f"resume with the saved value{'s' if len(changed) > 1 else ''}, or train this config "
           f"in a new workdir (init_from.path={directory} starts it from these weights)")
    if not changed:
        return CheckpointError(f"{where}: its saved data position does not fit this run's data "
                               f"pipeline ({cause}) although no data key changed since it was "
                               f"saved (another grain version?); {fix}", path=directory)
    (key, old, new), rest = changed[0], changed[1:]
    also = f"; also {describe(rest[:5])}{' ...' if len(rest) > 5 else ''}" if rest else ""
    return ConfigError(f"config key {key}: changed since {where} was saved ({old!r} -> {new!r}"
                       f"{also}), and the data position saved there does not fit the new data "
                       f"pipeline ({cause}); {fix}", key=key)
