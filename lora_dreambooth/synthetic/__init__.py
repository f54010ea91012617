"""The Synthetic DreamBench: an offline world of coloured shapes where DreamBooth can be shown to work.

* :mod:`.world` — the shapes, colours, captions and the subject (a striped triangle the base never saw);
* :mod:`.pretrain` — a tiny SD v1-layout base pretrained from scratch on CPU, cached by config (the package
  ships the default config's copy);
* :mod:`.detectors` — transparent readers of shape, colour and subject likeness (no learned model);
* :mod:`.measure` — sampling prompt families and summarizing what the detectors read;
* :mod:`.bench` — the run: base, two adapters from the real trainer (with / without prior), the measures;
* :mod:`.report` — the Markdown table and the picture grid.

Run it with ``python scripts/synthetic_dreambench.py``.
"""
