"""``autoseg report``: one self-contained HTML page that describes a work folder.

Modules:

* :mod:`~autoseg.report.collect` -- reads the work folder (logs, summaries, quality tables), never failing on a
  bad file;
* :mod:`~autoseg.report.cv` -- cross-validation Dice per case and class of every configuration or ensemble;
* :mod:`~autoseg.report.cases` -- the slice of a case the worst-case figures show;
* :mod:`~autoseg.report.figures` -- matplotlib figures as embedded PNG data URIs;
* :mod:`~autoseg.report.html` -- escaping, tables and the page with its inline style;
* ``sections_*`` -- one function per section; :mod:`~autoseg.report.build` -- :func:`write_report`.

Example:
    >>> from autoseg.report import write_report
    >>> write_report("autoseg_work/Dataset001_Brain")  # doctest: +SKIP
"""

from autoseg.report.build import ReportError, render_report, write_report

__all__ = ["ReportError", "render_report", "write_report"]
