"""Small Sphinx extension for the dlarch website.

- Removes duplicate inline scripts: with Jupyter Book 1, sphinx-thebe registers its config
  script twice, and browsers then report "Identifier 'THEBE_JS_URL' has already been declared".
- Adds the book's stylesheet, which labels every cell whose output was recorded on a GPU
  machine (cells tagged requires-cuda / requires-2-gpus / requires-tensorrt).
"""

from __future__ import annotations

from pathlib import Path


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        # the duplicate differs only in filename None vs '' (an inline script either way)
        key = (getattr(script, "filename", str(script)) or "", repr(getattr(script, "attributes", {})))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: later handlers (MathJax) append to this same list


def setup(app):
    app.connect("builder-inited", lambda app: app.config.html_static_path.append(str(Path(__file__).parent / "static")))
    app.add_css_file("dlarch.css")
    app.connect("html-page-context", _dedupe_scripts, priority=100)  # early: emit_firstresult stops at the first handler that returns
    return {"parallel_read_safe": True, "parallel_write_safe": True}
