"""Arena: campaigns and benign users through the guard; detection and the contest's metrics."""
