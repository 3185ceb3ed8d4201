"""The SYSGEN paper's own numbers (arXiv 2502.11330), shown beside ours as a labelled reference."""

from __future__ import annotations

# Table 2: instances Original -> P2 filtering -> P4 answer generation, with the percentages as
# printed (the paper truncates: 806,602 / 806,796 is 99.98%, printed 99.9%).
TABLE2: list[tuple[str, int, int, float, int, float]] = [
    ("LLaMA-3.1-8B-instruct", 806_796, 602_750, 74.7, 586_831, 72.7),
    ("Qwen2.5-14b-instruct", 806_796, 806_602, 99.9, 775_830, 96.2),
    ("Phi-4", 806_796, 774_613, 96.0, 773_878, 95.9),
]

# Table 8: generated tags per model (LLaMA-3.1-8B, Qwen2.5-14B, Phi-4).
TABLE8: dict[str, tuple[int, int, int]] = {
    "Role": (576_341, 753_579, 745_751),
    "Content": (580_231, 739_892, 743_311),
    "Task": (579_558, 765_331, 735_298),
    "Action": (495_301, 382_358, 662_589),
    "Style": (283_579, 598_553, 603_918),
    "Background": (293_791, 539_757, 553_791),
    "Tool": (10_238, 132_038, 90_989),
    "Format": (327_909, 401_593, 538_973),
}
TABLE8_MODELS = ("LLaMA-3.1-8B-instruct", "Qwen2.5-14b-instruct", "Phi-4")

# Table 1: new vs original answers: R1, R2, RL, BERTScore, BLEURT, GLEU, Len. (ratio).
TABLE1: list[tuple[str, float, float, float, float, float, float, float]] = [
    ("LLaMA-3.1-8B-instruct", 33.3, 15.6, 23.1, 81.3, 33.6, 28.2, 1.35),
    ("Qwen2.5-14b-instruct", 44.9, 23.2, 30.7, 85.9, 39.9, 39.2, 1.55),
    ("Phi-4", 51.9, 32.3, 41.1, 86.1, 40.1, 37.2, 1.89),
]
