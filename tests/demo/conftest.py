"""A small world's sizes (the short demo the demo tests share is ``short_demo`` in tests/conftest.py)."""

# a world for tests that need its files, not the demo's size (1,200 + 40 landmarks)
SMALL = {"train_landmarks": 300, "eval_landmarks": 20, "reading_pages": 200}
