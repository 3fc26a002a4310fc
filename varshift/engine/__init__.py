"""The Monte-Carlo engine: the Dropout → BatchNorm pipeline run as a framework runs it."""
