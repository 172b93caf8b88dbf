"""Data: LLaVA-format conversations and ShapesWorld, the offline synthetic data set (``shapes.py``)."""
