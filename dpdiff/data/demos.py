"""The built-in demos: private image sets generated offline and deterministically, no download.

The tiny base (``dpdiff/assets/tiny-sd-digits``) was pretrained on the *public* handwritten digits 0-4
of scikit-learn's digits set, and draws them from prompts like "a handwritten digit three".

* ``printed`` (the default, ``data.path=null``): what DP fine-tuning is for. A private domain of the
  same content in a new look: 4,000 printed digits 0-4 rendered from fonts in the same 8x8 scan format
  (``dpdiff.data.printed``), captioned "a digit three". Fine-tuning should make the model draw the
  requested digit in the private look; the base draws none of them printed.
* ``handwritten59``: the hard case, new concepts. The other half of scikit-learn's handwritten digits
  (5-9, about 160 images per digit), which the base has never drawn.

Each demo names its classes, caption, prompts for the sample grid, and the prompts of what the base
already drew (for the retention metric).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dpdiff.models.tiny import NUMBER_WORDS  # the words the tiny base's tokenizer knows


@dataclass(frozen=True, kw_only=True)
class BuiltinDemo:
    name: str
    summary: str
    digits: tuple[int, ...]  # the classes of the private images
    style: str  # "printed" | "handwritten": the look of the private images
    caption_template: str
    retention_template: str  # the base's own prompts, for what it already drew
    retention_digits: tuple[int, ...]
    materialize: Callable[[Path], Path]

    def caption(self, digit: int) -> str:
        return self.caption_template.format(NUMBER_WORDS[digit])

    def retention_prompt(self, digit: int) -> str:
        return self.retention_template.format(NUMBER_WORDS[digit])

    @property
    def sample_prompts(self) -> list[str]:
        return [self.caption(d) for d in self.digits]

    def directory(self) -> Path:
        from dpdiff.paths import home

        return self.materialize(home() / "datasets" / f"demo-{self.name}")


def _printed(directory: Path) -> Path:
    from dpdiff.data import printed

    return printed.materialize(directory, digits=PRINTED.digits, per_digit=800, seed=1, caption=PRINTED.caption)


def _handwritten59(directory: Path) -> Path:
    from dpdiff.data import digits

    return digits.materialize(directory, digits.PRIVATE_DIGITS)


PRINTED = BuiltinDemo(
    name="printed", summary="4,000 printed digits 0-4 (a new look of what the base draws)", digits=(0, 1, 2, 3, 4),
    style="printed", caption_template="a digit {}", retention_template="a handwritten digit {}",
    retention_digits=(0, 1, 2, 3, 4), materialize=_printed)
HANDWRITTEN59 = BuiltinDemo(
    name="handwritten59", summary="896 handwritten digits 5-9 (new concepts for the base)", digits=(5, 6, 7, 8, 9),
    style="handwritten", caption_template="a handwritten digit {}", retention_template="a handwritten digit {}",
    retention_digits=(0, 1, 2, 3, 4), materialize=_handwritten59)
DEMOS = {d.name: d for d in (PRINTED, HANDWRITTEN59)}
DEFAULT_DEMO = "printed"


def get_demo(name: str) -> BuiltinDemo:
    from dpdiff.errors import UserError

    try:
        return DEMOS[name]
    except KeyError:
        raise UserError(f"data.demo={name}: must be one of {', '.join(DEMOS)}") from None


def builtin_digits_dir() -> Path:
    """The handwritten digits 5-9 (the ``handwritten59`` demo), materialised under ``$DPDIFF_HOME``."""
    return HANDWRITTEN59.directory()


def write_distinct_caption_digits(root: Path, n: int) -> Path:
    """The first ``n`` built-in digits copied to ``root`` as an image folder, each caption made distinct ("a digit
    three number 17"), as most real datasets' captions are: the small sets the probe tests and benchmarks train
    to memorisation."""
    import json

    src = builtin_digits_dir()
    rows = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines()][:n]
    root = Path(root)
    root.mkdir(parents=True)
    out = []
    for i, r in enumerate(rows):
        (root / r["file_name"]).write_bytes((src / r["file_name"]).read_bytes())
        out.append({"file_name": r["file_name"], "text": f"{r['text']} number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return root
