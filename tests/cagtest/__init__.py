"""Test support shared by every test folder (and the benchmarks): ``tests/cagtest``.

Importable as ``cagtest`` because pytest's ``pythonpath`` option (pyproject) puts ``tests/`` on
``sys.path`` (bench scripts add it themselves); no test imports a conftest.

- :mod:`cagtest.dicom` — the one XA builder (on ``training.synthetic.dicom_writer``), ``dataset(**kw)``,
  Part 10 files, the pynetdicom and dcmtk senders;
- :mod:`cagtest.net` — ``free_port``, ``wait_for``, external tools;
- :mod:`cagtest.node` — test configs and a real ``cag-node serve`` subprocess;
- :mod:`cagtest.pacs` — dcmtk storescp, one scripted pynetdicom storage SCP, a silent peer;
- :mod:`cagtest.bundle` — the quick model bundle, cached under a hash of the sources that build it;
- :mod:`cagtest.imports` — a package's import graph and its cycles;
- the helpers of single folders: ``results``, ``reliability``, ``workflow``, ``web``, ``wait``,
  ``vlm_standin``, ``chat_server``.
"""
