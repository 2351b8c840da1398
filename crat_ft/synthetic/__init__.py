"""The synthetic long-tailed LVIS-format benchmark the demo trains and evaluates on
(docs/architecture.md#synthetic-benchmark).

Split by job: :mod:`~crat_ft.synthetic.variants` (what to generate: the classes of each variant and their
long tail), :mod:`~crat_ft.synthetic.render` (drawing one image and its masks) and
:mod:`~crat_ft.synthetic.dataset` (the images and annotation files laid out as LVIS v1).
"""
