"""The frozen detector and what is read from it: building and checking the mmdet detector
(:mod:`~crat_ft.detector.frozen`), which RoIs are cached (:mod:`~crat_ft.detector.roi_policy`) and the
features extracted for them (:mod:`~crat_ft.detector.extractor`).
"""
