"""Training data, apart from the segment stages: dataset readers, augmentation, synthetic scenes."""
