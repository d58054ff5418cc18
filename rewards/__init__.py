"""Reward models: images `[B,3,H,W]` in [0,1] plus prompts in, scores `[B]` out.

    reward = rewards.build_reward("imagereward:1.0,aesthetic:0.5", paths={...})
    out = reward(images, prompts)          # out.scores [B], out.parts {"imagereward": [B], ...}
    report = rewards.check_finite(out)     # which samples/parts went NaN or inf
    rewards.check_reward(spec, paths={...})  # before a run: the spec parses, the files exist

User errors (a bad spec, a missing model file, unreadable input) are `rewards.RewardError`;
the `texforce` command line prints them as one line and exits with code 2.

Importable without Ray; model libraries are imported when a reward is built.

Model files come from `paths` (or the environment variable `TEXFORCE_<KEY>`); nothing is downloaded.
`texforce rewards list` prints the same table.

| reward                  | paths keys                                                               |
|-------------------------|--------------------------------------------------------------------------|
| imagereward             | imagereward (ImageReward.pt, or its directory), imagereward_med_config   |
|                         | (default: med_config.json next to it), imagereward_tokenizer (bert dir)  |
| hpsv2 / hpsv2_1         | hpsv2 (HPS_v2_compressed.pt) / hpsv2_1 (HPS_v2.1_compressed.pt),         |
|                         | hps_tokenizer (CLIP tokenizer dir)                                       |
| pickscore               | pickscore (CLIPModel dir), pickscore_tokenizer (default: the model dir)  |
| clip_score              | clip_score (CLIPModel dir), clip_score_tokenizer (default: the model dir)|
| aesthetic               | aesthetic (sac+logos+ava1-l14-linearMSE.pth), aesthetic_clip (ViT-L/14)  |
| face_quality /          | mediapipe_python (optional: a Python with mediapipe==0.10.21)            |
| hand_detection          |                                                                          |
| color_alignment, brightness, jpeg_compressibility, jpeg_incompressibility | none           |
"""
from rewards.base import (
    FiniteReport,
    Reward,
    RewardDependencyError,
    RewardError,
    RewardFileError,
    RewardOutput,
    RewardSpecError,
    Scorer,
    check_finite,
)
from rewards.files import FileSpec
from rewards.registry import (
    RewardEntry,
    build_reward,
    check_path_keys,
    check_reward,
    get_entry,
    list_entries,
    parse_spec,
    register,
)

__all__ = [
    "FileSpec", "FiniteReport", "Reward", "RewardDependencyError", "RewardEntry", "RewardError", "RewardFileError",
    "RewardOutput", "RewardSpecError", "Scorer", "build_reward", "check_finite", "check_path_keys", "check_reward",
    "get_entry", "list_entries", "parse_spec", "register",
]
