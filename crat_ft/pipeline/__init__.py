"""The commands' library functions, each joining the layers below it into one pipeline stage.

Extraction (:mod:`~crat_ft.pipeline.extract`, with :mod:`~crat_ft.pipeline.extract_settings` and
:mod:`~crat_ft.pipeline.extract_segments`); retraining the heads (:mod:`~crat_ft.pipeline.retrain`, with
:mod:`~crat_ft.pipeline.retrain_builders` and :mod:`~crat_ft.pipeline.retrain_record`); training and evaluating
whole detectors (:mod:`~crat_ft.pipeline.train_detector`, :mod:`~crat_ft.pipeline.evaluate`,
:mod:`~crat_ft.pipeline.evaluate_jobs`); ablations (:mod:`~crat_ft.pipeline.ablate`, with
:mod:`~crat_ft.pipeline.ablate_arms` and :mod:`~crat_ft.pipeline.ablate_table`); and the demo
(:mod:`~crat_ft.pipeline.demo`, with :mod:`~crat_ft.pipeline.demo_stages` and :mod:`~crat_ft.pipeline.demo_report`).
"""
