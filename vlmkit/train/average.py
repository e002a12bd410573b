"""An exponential moving average of the trainable weights (`ema` in the config).

The last steps of a short run still move the weights by the learning rate's share of noise, so where the
run happens to stop decides some answers. The average follows the weights with a time constant of `ema`
times the run's steps, and replaces them before the final eval and the save. It is kept beside the
weights in their own dtype and device, updated after each optimizer step, and saved in the checkpoint so
a resumed run ends with the same average.
"""

from __future__ import annotations

import torch


class WeightAverage:
    def __init__(self, named_params: list[tuple[str, torch.Tensor]], share: float, total_steps: int):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = 1.0 - 1.0 / max(1.0, share * total_steps)
        self.updates = 0

    def update(self) -> None:
        """Move the average toward the weights. Until the run has made as many steps as the time constant,
        it is the plain mean of the weights after each step, so the starting weights do not linger in it."""
        self.updates += 1
        decay = min(self.decay, (self.updates - 1) / self.updates)
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def apply(self) -> None:
        """Put the average in place of the weights."""
        with torch.no_grad():
            for param, average in zip(self.params, self.shadow):
                param.copy_(average)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "shadow": {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.decay = state.get("decay", self.decay)  # the time constant of the run's first plan
        with torch.no_grad():
            for name, average in zip(self.names, self.shadow):
                average.copy_(state["shadow"][name])
