"""Local lm-eval tasks over bundled data: they work offline and from any working directory.

Each ``cpt_*.yaml`` loads its rows through ``cpt_local_data.load`` (``custom_dataset``), which
resolves ``data/<file>`` against this folder, so the tasks do not depend on the current directory
(``data_files`` in a task YAML would). All carry the tag ``cpt_local``.
"""
