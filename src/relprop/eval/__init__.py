"""Benchmarks as resumable runs, all on one runner (``runner.Benchmark``, ``runner.run_benchmark``;
``relprop eval NAME`` for each registered one): the paper's two vision benchmarks (Chefer, Gur &
Wolf, CVPR 2021) defined as in the authors' scripts, its text rationale benchmark
(``rationale``), and a class-specificity test.

Perturbation test (``perturbation.run_perturbation``, ``relprop eval perturbation``):
data is an ImageNet-style folder ``DATA/<class_dir>/<image>``; class indices come from the
sorted folder names unless a label map is given. Result: top-1 accuracy after removing
0%, 10%, ..., 90% of the pixels (positive: most relevant first; negative: least relevant
first) and its AUC (x100, the paper's scale: lower is better for positive, higher for
negative).

Segmentation test (``segmentation.run_segmentation``, ``relprop eval segmentation``):
data is the ImageNet-segmentation file ``gtsegs_ijcv.mat`` or a folder
``DATA/images/NAME.ext`` + ``DATA/masks/NAME.png`` (mask > 0 is foreground). Results:
pixel accuracy, IoU per class, mIoU and mAP, stored as fractions in [0, 1] (the CLI
prints percentages, like the paper).

A mask of another size than its image is not stretched onto it: that sample fails, and is
listed with both sizes.

Output folder: ``<benchmark>.jsonl`` (one fsynced record per sample, method and mode;
a rerun skips what is there; under torchrun each rank appends to ``<benchmark>.rank<R>.jsonl``,
merged by rank 0), ``<benchmark>_run.json`` (what the results depend on: the
model's weight fingerprint and the settings; each record also carries its sample's data
fingerprint), ``<benchmark>_summary.json`` (settings, per-method results and the samples
that failed) and ``perturbation.png``. One run at a time may use a folder, and results made
with other weights, data or settings are refused rather than mixed in; ``restart`` moves
them into ``previous-<time>/`` (``rundir``).
"""
