"""Synthetic cohort: pyramidal JPEG TIFF "slides" shaped like real H&E, with known ground truth.

Every slide has three latent parameters in [0, 1] (``truth.json``):

* ``density``: nuclei per area of the slide's **signal regions** (170 + 200 * density nuclei per 128 x 128 um);
* ``nuclei_size``: nucleus radius in the signal regions (1.6 + 2.4 * nuclei_size um, log-normal spread 0.2);
* ``stain``: hematoxylin strength of the whole slide (pink/light purple to dark purple).

The signal regions are small nuclei-rich blobs (40-110 um radius, 5-12 % of the tissue); the rest of the
tissue carries nothing: cellular tissue whose nuclei density and size are per-slide nuisance
(``bulk_density``, ``bulk_size``), smooth stroma, fat, out-of-focus bands, and artefacts (pen marks,
folds, air bubbles, debris blobs, debris specks on glass; their level-0 boxes are in ``truth.json``).
Where the visible signal is, per slide: ``signal/<slide_id>.png`` (:func:`read_signal_truth`,
:meth:`SignalTruth.patch_fraction`), so the precision and recall of a patch selection has a known answer.
``make_cohort(local_signal=False)`` gives the earlier design instead: no signal regions, the latent
density and size in all cellular tissue (any tissue patch carries the signal).

Samples of one patient share the patient's parameters (+ N(0, 0.05) jitter). With ``c = 2 * z - 1``
(z = [density, nuclei_size, stain]) each gene g has raw counts

    counts[s, g] ~ Poisson(exp(bias[g] + weights[g] . c[s] + eps)),   eps ~ N(0, noise^2)

``bias ~ U(log 20, log 2000)``, ``weights ~ N(0, 1.2^2)``; genes 0, 1, 2 are markers of density,
nuclei_size and stain alone (weight 2), and ``null_fraction`` of the other genes have zero weights
(unpredictable). MSI status is per patient: MSI-H when ``3 c_density - 2 c_size + N(0, 0.3^2) > 1``
(lymphocyte-rich tissue: many small nuclei), with at least one patient of each class. Output is
deterministic given ``seed``.

The score distribution of the tissue patches follows real H&E (``tests/data/real_tissue_scores.json``,
docs/selection.md): information-rich tissue dominates, with a long lower tail of edges, stroma, fat,
blur and artefacts, so the per-slide scores are left-skewed as on real slides: the mean skew of
slides of 2048 px at p = 128 and 256 px is within :data:`SKEW_TOLERANCE` of a real scanned slide's
(``tests/test_synth.py`` checks it against the stored summary).

Slides with a side above :data:`STREAM_SIDE` (benchmark sizes, up to 100000 px) are rendered in
:data:`BLOCK`-px blocks, each a small slide of its own, and streamed to the TIFF tile by tile
(:func:`write_streamed_pyramid`): memory is one strip of blocks, not the slide.

Modules: :mod:`~isg.io.synth.tissue` (one image), :mod:`~isg.io.synth.tiff` (pyramidal TIFFs),
:mod:`~isg.io.synth.cohort` (the cohort), :mod:`~isg.io.synth.truth` (signal masks).
"""

from isg.io.synth import cohort
from isg.io.synth.cohort import SlideTruth, SynthCohort, make_bad_slides, make_cohort, render_blocks, write_slide
from isg.io.synth.tiff import pyramid, pyramid_shapes, write_pyramid_tiff, write_streamed_pyramid
from isg.io.synth.tissue import ARTEFACTS, BACKGROUND, REGIONS, TRUTH_DOWNSAMPLE, Rendered, render_slide, render_tissue
from isg.io.synth.truth import SIGNAL_DIR, SignalTruth, read_signal_truth, write_signal_mask

SKEW_TOLERANCE = 0.5  # stated tolerance: synthetic per-slide score skew within this of the real slide's (docs/selection.md)
STREAM_SIDE = cohort.STREAM_SIDE  # read by write_slide from isg.io.synth.cohort (patch it there)
BLOCK = cohort.BLOCK

__all__ = ["ARTEFACTS", "BACKGROUND", "BLOCK", "SKEW_TOLERANCE", "REGIONS", "SIGNAL_DIR", "STREAM_SIDE", "TRUTH_DOWNSAMPLE", "Rendered", "SignalTruth",
           "SlideTruth", "SynthCohort", "make_bad_slides", "make_cohort", "pyramid", "pyramid_shapes", "read_signal_truth",
           "render_blocks", "render_slide", "render_tissue", "write_pyramid_tiff", "write_signal_mask", "write_slide",
           "write_streamed_pyramid"]
