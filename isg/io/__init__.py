"""Slides and tiles: readers behind one :class:`Slide` interface, tissue prefilter, tile grids and
batched tile streaming, plus a synthetic cohort generator (:mod:`isg.io.synth`)."""

from isg.io.slide import BACKENDS, MIN_SLIDE_SIZE, Slide, SlideError, mpp_from_description, mpp_from_resolution, open_slide

__all__ = ["BACKENDS", "MIN_SLIDE_SIZE", "Slide", "SlideError", "mpp_from_description", "mpp_from_resolution", "open_slide"]
