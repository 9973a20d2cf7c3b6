"""What decides a training run, and the defaults of each role (no TensorFlow needed to read them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxrbatch.errors import UsageError
from cxrbatch.modelinput import InputSpec

SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved in the checkpoint sidecar."""

    role: str
    size: int
    alpha: float = 1.0
    views: int = 4
    epochs1: int = 40
    epochs2: int = 8
    batch_size: int = 64
    lr1: float = 1e-3
    lr2: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.0  # classifier only
    clahe: float = 0.0  # classifier only: CLAHE clip limit instead of global equalisation
    seed: int = 1234
    cache_layer: str = "block_12_add"  # frozen below (cached once), trainable above in phase 2
    source_alignment: float = 0.0  # classifier only: weight of the per-class source alignment loss in phase 2
    exclude_sources: tuple[str, ...] = ()  # manifest sources left out of train and val (leave-source-out runs)
    zoom_out: float = 0.0  # chance that an augmented view is set in a wider frame (`augment.zoom_out_frame`)
    crop_area: float = 0.70  # the other views are cropped to this share of the film's area or more
    negative_label: str | None = None  # classifier only: the class that is not a finding (a class folder)
    positive_label: str | None = None  # gate only: the class folder of chest X-rays, which its sigmoid scores

    def __post_init__(self) -> None:
        if not 0.0 <= self.zoom_out <= 1.0 or not 0.0 < self.crop_area <= 1.0:
            raise UsageError(
                f"zoom_out must be in [0, 1] and crop_area in (0, 1], not {self.zoom_out}, {self.crop_area}"
            )
        # what MobileNetV2 and the two phases can run with, refused before any work rather than after
        wrong = [
            f"{name} {value} (at least {least})"
            for name, value, least in (
                ("size", self.size, 32),
                ("views", self.views, 1),
                ("epochs1", self.epochs1, 1),
                ("epochs2", self.epochs2, 0),
                ("batch_size", self.batch_size, 1),
            )
            if value < least
        ]
        if not self.alpha > 0:
            wrong.append(f"alpha {self.alpha} (above 0)")
        if not 0 <= self.seed < SEED_LIMIT:  # numpy's and Keras's seeding take no other
            wrong.append(f"seed {self.seed} (0 to {SEED_LIMIT - 1})")
        if wrong:
            raise UsageError(f"cannot train with {', '.join(wrong)}")

    def input_spec(self) -> InputSpec:
        """Gate sees colour (photos are colourful); the classifier sees equalised grey."""
        if self.role == "gate":
            return InputSpec(self.size, self.size, channels=3, colour="rgb", equalize=False)
        return InputSpec(self.size, self.size, channels=1, colour="grey", equalize=not self.clahe, clahe=self.clahe)


DEFAULTS = {
    "gate": TrainConfig(role="gate", size=112, views=3, positive_label="XRAY"),
    "classifier": TrainConfig(
        role="classifier",
        size=224,
        views=10,
        epochs2=30,
        lr2=3e-5,
        cache_layer="block_5_add",
        zoom_out=0.5,
        negative_label="NORMAL",
    ),
}


def sidecar_path(ckpt: Path) -> Path:
    """Where the JSON summary of a checkpoint lives."""
    return ckpt.with_name(ckpt.name + ".json")
