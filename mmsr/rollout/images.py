"""Each image patchified once per rollout.

The ``n`` episodes of a GRPO group start from one question image, and a search tool that returns the
same picture to several episodes (a local index's thumbnails) hands back the same object. Patchifying
is per image work on the CPU (~70 ms for a 1024x768 picture under the 7B recipes' pixel bounds) and
its ``pixel_values`` are the largest thing a trajectory holds (~15 MB there): processed once per group
instead of once per episode, a step of 16 prompts x 8 episodes per rank does 16 of them, not 128, and
its episodes hold one copy of each. The episodes then share one ``VisionInput`` (it is never mutated).
"""

from __future__ import annotations

from PIL import Image

from mmsr.models.policy import Policy
from mmsr.models.vision import VisionInput


class ProcessedImages:
    """``policy.process_image`` remembered by image object (for one rollout: it holds the images).

    Args:
        policy: does the processing (question images, and tool images within the tool bounds).
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # keyed by id(); the image is kept beside its input, so the id cannot be reused by another object
        self._done: dict[tuple[int, bool], tuple[Image.Image, VisionInput]] = {}

    def __call__(self, image: Image.Image, tool: bool = False) -> VisionInput:
        """The ``VisionInput`` of ``image`` (``tool``: a tool's image, resized within the tool bounds)."""
        key = (id(image), tool)
        if key not in self._done:
            self._done[key] = (image, self.policy.process_image(image, tool=tool))
        return self._done[key][1]

    def __len__(self) -> int:
        return len(self._done)
