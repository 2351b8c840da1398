"""The ground floor every stage stands on; it imports nothing else of crat-ft.

Errors (:mod:`~crat_ft.common.errors`), safe file writes and locks (:mod:`~crat_ft.common.files`), the
progress line (:mod:`~crat_ft.common.progress`), run records (:mod:`~crat_ft.common.run_record`), torchrun
(:mod:`~crat_ft.common.dist`), the software stack (:mod:`~crat_ft.common.envinfo`), the shipped configs'
location (:mod:`~crat_ft.common.paths`) and the LVIS json every stage reads (:mod:`~crat_ft.common.lvis_json`).
"""
