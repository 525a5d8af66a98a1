"""Evaluation of generated single-cell expression (protocol: docs/evaluation.md).

Entry points: ``protocol.evaluate`` (arrays/AnnData in, results dict out), ``report.write_report``
and ``figures.write_figures`` (report folder), ``cli.main`` (h5ad files or the pbmc68k fixture,
read and checked by ``inputs``).
"""
