"""Training: supervised backbone pretraining on glyph base classes, and adaptation-module tuning."""
