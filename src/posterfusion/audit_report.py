"""``fusion audit --report audit.html``: an audit's findings as one self-contained page.

The page is for the person who fixes the catalogue: per genre, how many of its labelled posters do
not convey it and how many posters probably miss it; then each kind of finding ranked by score,
with the poster, its labels against what the poster says, and why. Like the evaluation report,
thumbnails are inlined as data URLs, with inline CSS and no scripts or fonts, so it opens offline.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

from .audit import KINDS, MISSING, NOT_CONVEYED, PosterAudit
from .files import write_text_atomic
from .predict import evidence_lines
from .report import STYLE, thumbnail

AUDIT_STYLE = STYLE + """
.finding { display: flex; gap: .8rem; border-top: 1px solid #eee; padding: .5rem 0; }
.finding img { width: 96px; height: 144px; object-fit: cover; }
.finding .score { font-weight: bold; }
.finding ul { margin: .2rem 0; padding-left: 1.2rem; }
.up { color: #1a7f37; } .down { color: #b42318; }
"""


def summary_by_genre(audits: list[PosterAudit], genres: list[str]) -> list[dict]:
    """Per genre: labelled posters, how many of them do not convey it, how many more probably miss it."""
    labelled = Counter(g for a in audits if not a.error for g in a.labelled)
    found = Counter((f.kind, f.genre) for a in audits for f in a.findings)
    return [{"genre": g, "labelled": labelled[g], "not_conveyed": found[(NOT_CONVEYED, g)],
             "share_not_conveyed": found[(NOT_CONVEYED, g)] / labelled[g] if labelled[g] else None,
             "probably_missing": found[(MISSING, g)]} for g in genres]


def _summary(rows: list[dict]) -> str:
    body = "".join(
        f'<tr data-genre="{html.escape(r["genre"])}"><td>{html.escape(r["genre"])}</td><td>{r["labelled"]}</td>'
        f'<td data-key="not_conveyed">{r["not_conveyed"]}</td>'
        f'<td>{"–" if r["share_not_conveyed"] is None else format(r["share_not_conveyed"], ".0%")}</td>'
        f'<td data-key="probably_missing">{r["probably_missing"]}</td></tr>'
        for r in rows
    )
    return ('<table id="summary"><tr><th>genre</th><th>labelled posters</th><th>not conveyed</th><th>share</th>'
            f"<th>probably missing</th></tr>{body}</table>")


def _finding_block(audit: PosterAudit, kind: str) -> str:
    url = thumbnail(audit.path)
    picture = f'<img src="{url}" alt="{html.escape(Path(audit.path).name)}">' if url else '<span class="muted">unreadable now</span>'
    items = []
    for f in audit.findings:
        if f.kind != kind:
            continue
        why = ", ".join(f'<span class="{"up" if change > 0 else "down"}">{html.escape(name)} {change:+.2f}</span>'
                        for name, change in f.evidence)
        items.append(f'<li><span class="score">{html.escape(f.genre)}: score {f.score:.2f}</span> '
                     f"(p {f.probability:.2f}, threshold {f.threshold:.2f}){'; moved (bits) by ' + why if why else ''}</li>")
    seen = "<br>".join(html.escape(line) for line in evidence_lines(audit.seen))
    return (f'<div class="finding" data-kind="{kind}">{picture}<div><b>{html.escape(audit.path)}</b><br>'
            f"labelled: {html.escape(' | '.join(audit.labelled) or 'none the model knows')}<br>"
            f"the poster says: {html.escape(' | '.join(audit.predicted))}<ul>{''.join(items)}</ul>"
            f'<span class="muted">{seen}</span></div></div>')


def render_audit_report(audits: list[PosterAudit], genres: list[str], title: str, top: int,
                        unknown: dict[str, int]) -> str:
    """The page for these audit records: summary, then the ``top`` highest-scored posters per kind."""
    readable = [a for a in audits if not a.error]
    sections = []
    for kind, blurb in zip(KINDS, ("labelled genres the poster gives little evidence of",
                                   "genres the record lacks that the poster strongly suggests")):
        ranked = sorted((a for a in readable if any(f.kind == kind for f in a.findings)),
                        key=lambda a: -max(f.score for f in a.findings if f.kind == kind))
        blocks = "".join(_finding_block(a, kind) for a in ranked[:top])
        sections.append(f'<h2 id="{kind.replace(" ", "-")}">{kind.capitalize()} ({len(ranked)} posters; '
                        f'the top {min(top, len(ranked))} shown)</h2><p class="muted">{blurb}</p>{blocks or "none"}')
    failed = [a for a in audits if a.error]
    failures = "".join(f"<li>{html.escape(a.path)}: {html.escape(a.error)}</li>" for a in failed)
    notes = (f"<p>Genres in the catalogue the model does not know (left out): "
             f"{html.escape(', '.join(f'{g} ({n} posters)' for g, n in unknown.items()))}</p>" if unknown else "")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{AUDIT_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="muted">{len(readable)} posters checked, {len(failed)} unreadable. Scores are in bits: '
        "a label not conveyed scores the halvings between its probability and its threshold (1: half of it), "
        "a probably missing genre its log-odds (0: even odds, 1: 2 to 1, 2: 4 to 1).</p>"
        f"{notes}<h2>Per genre</h2>{_summary(summary_by_genre(audits, genres))}{''.join(sections)}"
        + (f'<h2 id="unreadable">Unreadable posters</h2><ul>{failures}</ul>' if failed else "")
        + "</body></html>\n"
    )


def write_audit_report(path: str | Path, audits: list[PosterAudit], genres: list[str], title: str, top: int,
                       unknown: dict[str, int]) -> None:
    """:func:`render_audit_report`, written atomically."""
    write_text_atomic(path, render_audit_report(audits, genres, title, top, unknown))
