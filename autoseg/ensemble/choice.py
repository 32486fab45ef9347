"""The choice ``find-best`` writes (``selection/best.json``) and ``predict``, ``export`` and the report read.

>>> choice = BestChoice(name="3d_fullres", members=(Member("3d_fullres", ("0", "1")),))
>>> BestChoice.from_json(choice.to_json()) == choice
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import FileFormatError
from autoseg.io.atomic import read_json, write_json_atomic

SELECTION = "selection"
BEST = "best.json"
POSTPROCESSING = "postprocessing.json"
#: the quality flag's threshold and how well the quality scores rank the CV errors
QUALITY_RULE = "quality.json"
#: version of :class:`BestChoice` written now
VERSION = 1
_FIX = "run `autoseg find-best` again to rewrite it"


@dataclass(frozen=True)
class Member:
    """One configuration of a chosen model and the folds whose networks are averaged."""

    configuration: str
    folds: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"configuration": self.configuration, "folds": list(self.folds)}


def _safe_name(value: Any, path: Path | str) -> str:
    """Names become paths (``models/<configuration>/fold_<k>``, ``selection/<postprocessing>``): none may leave
    its folder."""
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) in ("", ".", "..") \
            or any(c in str(value) for c in "/\\\0"):
        raise FileFormatError(f"{path}: {value!r} is not a configuration, fold or file name (names must not hold "
                              f"path separators); {_FIX}.")
    return str(value)


@dataclass(frozen=True)
class BestChoice:
    """The chosen pipeline: its members, postprocessing file and label map, and how it scored on CV.

    Attributes:
        name: the candidate's name (a configuration, or ``ensemble__a__b``).
        members: the configurations and folds, averaged.
        postprocessing: file name of the learnt rules in ``selection/`` (None: no rule kept).
        label_map: output relabelling ``{"old": new}`` a bundle applies (None: none).
        metric: the metric the candidates were ranked by.
        score: the chosen candidate's CV score before postprocessing.
        score_after_postprocessing: and after.
        n_cases: CV cases scored.
        predict_command: an explicit command reproducing the choice.
        version: the file's version.
    """

    name: str
    members: tuple[Member, ...]
    postprocessing: str | None = None
    label_map: dict[str, int] | None = None
    metric: str | None = None
    score: float | None = None
    score_after_postprocessing: float | None = None
    n_cases: int | None = None
    predict_command: str | None = None
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def configurations(self) -> list[str]:
        """The members' configuration names."""
        return [m.configuration for m in self.members]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, keys in the order ``find-best`` writes them (``label_map`` last, where a bundle set it)."""
        out = {"version": self.version, "metric": self.metric, "score": self.score, "name": self.name,
               "members": [m.to_json() for m in self.members], "n_cases": self.n_cases,
               "postprocessing": self.postprocessing, "score_after_postprocessing": self.score_after_postprocessing,
               "predict_command": self.predict_command}
        out.update({k: v for k, v in self.extra.items() if k != "label_map"})
        if self.label_map is not None or "label_map" in self.extra:
            out["label_map"] = self.label_map
        return out

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike[str] = BEST) -> BestChoice:
        """Read a choice, checking every name that becomes a path.

        Raises:
            FileFormatError: not an object, no members, a name that is not a plain name, or a newer version.
        """
        if not isinstance(data, dict) or not isinstance(data.get("members"), list) or not data["members"]:
            raise FileFormatError(f"{path}: no 'members' list; {_FIX}.")
        if int(data.get("version", 1)) > VERSION:
            raise FileFormatError(f"{path}: version {data['version']} is newer than this autoseg reads; upgrade autoseg.")
        members = []
        for m in data["members"]:
            m = m if isinstance(m, dict) else {}
            folds = m.get("folds")
            members.append(Member(_safe_name(m.get("configuration"), path),
                                  tuple(_safe_name(f, path) for f in (folds if isinstance(folds, list) else []))))
        post = data.get("postprocessing")
        known = {"version", "metric", "score", "name", "members", "n_cases", "postprocessing",
                 "score_after_postprocessing", "predict_command"}  # a label_map key stays in extra: it is written back
        return cls(name=str(data.get("name") or "+".join(m.configuration for m in members)), members=tuple(members),
                   postprocessing=_safe_name(post, path) if post else None, label_map=data.get("label_map"),
                   metric=data.get("metric"), score=data.get("score"),
                   score_after_postprocessing=data.get("score_after_postprocessing"), n_cases=data.get("n_cases"),
                   predict_command=data.get("predict_command"), version=int(data.get("version", 1)),
                   extra={k: v for k, v in data.items() if k not in known})

    def save(self, workdir: str | os.PathLike[str]) -> Path:
        """Write ``<workdir>/selection/best.json`` atomically."""
        path = Path(workdir) / SELECTION / BEST
        write_json_atomic(path, self.to_json())
        return path


def load_best(workdir: str | os.PathLike[str]) -> BestChoice | None:
    """``selection/best.json`` of a work folder (or bundle), or None when there is none.

    Raises:
        FileFormatError: the file is malformed (the message says how to rewrite it).
    """
    path = Path(workdir) / SELECTION / BEST
    if not path.is_file():
        return None
    return BestChoice.from_json(read_json(path, FileFormatError, _FIX), path)
