"""Loss scaling for fp16: a constant scale, or Megatron's dynamic scaler.

Dynamic: start at `initial_scale` (2^32), halve after `hysteresis` overflowing steps
(never below `min_scale`), double after `growth_interval` consecutive clean steps.
An overflowing step is skipped by the optimizer and counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConstantLossScaler:
    scale: float = 1.0

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]


@dataclass
class DynamicLossScaler:
    scale: float = 2.0 ** 32
    min_scale: float = 1.0
    growth_interval: int = 1000
    hysteresis: int = 2
    _clean_steps: int = 0
    _hysteresis_left: int = -1

    def __post_init__(self):
        if self._hysteresis_left < 0:
            self._hysteresis_left = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps == self.growth_interval:
                self._clean_steps = 0
                self._hysteresis_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps,
                "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self._clean_steps = state["clean_steps"]
        self._hysteresis_left = state["hysteresis_left"]


def build_loss_scaler(training_config):
    """fp16 gets a dynamic scaler unless --loss-scale fixes one; others get scale 1."""
    t = training_config
    if t.fp16 and t.loss_scale is None:
        return DynamicLossScaler(scale=t.initial_loss_scale, min_scale=t.min_loss_scale,
                                 growth_interval=t.loss_scale_window, hysteresis=t.hysteresis)
    return ConstantLossScaler(t.loss_scale if (t.fp16 and t.loss_scale) else 1.0)
