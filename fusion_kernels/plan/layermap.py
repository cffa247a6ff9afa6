"""Layer map (part of planning): the base layer each tuned language-model layer was tuned from.

Most multimodal models keep their language model's layers as they were: tuned layer ``i`` is
base layer ``i`` (the identity). Some insert layers: Mllama (Llama-3.2-Vision) interleaves
cross-attention layers, listed in its config as ``text_config.cross_attention_layers``; those have
no base counterpart (they are copied from tuned, gates included) and the others shift down
(with cross-attention layers ``[1, 3]`` in five layers: ``0,new,1,new,2``).

The map is written as one entry per tuned layer, in order: a base layer index, an ascending range
``A-B`` of them, or ``new``. ``--layer-map`` takes that text; ``--dry-run`` prints it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ParameterError, PlanError
from ..io.checkpoint import Checkpoint
from ..io.safeload import MAX_INDEX_BYTES, load_json

IDENTITY = "identity"
NEW = "new"
# Where a config says which layers an architecture inserted into its language model.
_INSERTED_KEYS = ("cross_attention_layers",)


@dataclass(frozen=True)
class LayerMap:
    """``layers[i]``: the base layer of tuned layer ``i``, or None when it is new; ``layers`` None:
    the identity. ``prefix``: the base's layer prefix (``model.``) the map applies under."""

    layers: tuple[int | None, ...] | None = None
    source: str = IDENTITY
    prefix: str = ""

    @property
    def is_identity(self) -> bool:
        return self.layers is None

    @property
    def new_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.layers or ()) if b is None]

    def rename(self, base_space_name: str) -> str | None:
        """``model.layers.I.rest`` → ``model.layers.J.rest`` (J: I's base layer); None when layer I
        is new; other names unchanged. Raises PlanError for a layer past the map's end."""
        if self.layers is None:
            return base_space_name
        match = _layer_pattern(self.prefix).match(base_space_name)
        if match is None:
            return base_space_name
        index = int(match.group(1))
        if index >= len(self.layers):
            raise PlanError(
                f"the layer map ({self.source}) lists {len(self.layers)} tuned layers but tuned "
                f"has layer {index}; give one --layer-map entry per tuned layer"
            )
        base_index = self.layers[index]
        if base_index is None:
            return None
        return f"{self.prefix}layers.{base_index}.{match.group(2)}"

    def describe(self) -> str:
        if self.layers is None:
            return IDENTITY
        new = ", ".join(map(str, self.new_layers)) or "none"
        return f"{format_layers(self.layers)} ({self.source}; new tuned layers: {new})"

    def as_dict(self) -> dict:
        spec = None if self.layers is None else format_layers(self.layers)
        return {"source": self.source, "spec": spec, "layers": _as_list(self.layers)}


def _as_list(layers):
    return None if layers is None else list(layers)


def _layer_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.(.+)$")


def parse_layers(text: str) -> tuple[int | None, ...] | None:
    """``0-2,new,3`` → ``(0, 1, 2, None, 3)``; ``identity`` → None. Each base layer at most once."""
    text = text.strip()
    if text == IDENTITY:
        return None
    layers: list[int | None] = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if item == NEW:
            layers.append(None)
        elif match and (match.group(2) is None or int(match.group(2)) >= int(match.group(1))):
            first = int(match.group(1))
            layers.extend(range(first, int(match.group(2) or first) + 1))
        else:
            raise ParameterError(
                f"--layer-map {text!r}: {item!r} is not a base layer, an ascending range A-B or "
                "'new' (write one entry per tuned layer, e.g. 0,new,1-2, or 'identity')"
            )
    used = [b for b in layers if b is not None]
    if len(set(used)) != len(used):
        twice = next(b for b in used if used.count(b) > 1)
        raise ParameterError(f"--layer-map {text!r} pairs base layer {twice} more than once")
    return tuple(layers)


def format_layers(layers: tuple[int | None, ...]) -> str:
    """The inverse of :func:`parse_layers`, runs of consecutive layers written as ranges."""
    parts: list[str] = []
    run: list[int] = []
    for base in (*layers, "end"):
        if run and (base in (None, "end") or base != run[-1] + 1):
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if base is None:
            parts.append(NEW)
        elif base != "end":
            run.append(base)
    return ",".join(parts)


def from_config(config: dict) -> LayerMap:
    """The map a model's config implies: inserted layers (``cross_attention_layers``) are new."""
    for section, where in ((config.get("text_config"), "text_config."), (config, "")):
        if not isinstance(section, dict):
            continue
        for key in _INSERTED_KEYS:
            inserted = section.get(key)
            count = section.get("num_hidden_layers")
            if inserted and isinstance(count, int):
                new = set(inserted)
                layers, base = [], 0
                for index in range(count):
                    layers.append(None if index in new else base)
                    base += index not in new
                return LayerMap(tuple(layers), f"config.json {where}{key}")
    return LayerMap()


def layer_map_for(tuned: Checkpoint, text: str | None, prefix: str) -> LayerMap:
    """``--layer-map`` when given, else what tuned's ``config.json`` implies, else the identity."""
    if text is not None:
        layers = parse_layers(text)
        return LayerMap(layers, "--layer-map" if layers is not None else IDENTITY, prefix)
    config_path = tuned.path / "config.json"
    if not tuned.path.is_dir() or not config_path.is_file():
        return LayerMap(prefix=prefix)
    config = load_json(config_path, MAX_INDEX_BYTES, PlanError)
    found = from_config(config) if isinstance(config, dict) else LayerMap()
    return LayerMap(found.layers, found.source, prefix)
