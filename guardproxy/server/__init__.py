"""The HTTP side: the only place that does network I/O."""
