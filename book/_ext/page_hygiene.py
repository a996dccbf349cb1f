"""Two small corrections to the HTML that Jupyter Book 1.x writes, so pages load without errors.

- ``sphinx-thebe`` and ``sphinx-togglebutton`` inline scripts are added twice per page (with two
  priorities) by jupyter-book 1.0; the repeated ``const`` declaration logs an error in the
  browser console. Keep the first copy of each script.
- The pydata theme reads the colour mode from the page and logs an error when it is empty; give it
  the theme's own default ("auto") when no mode was configured.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        key = (getattr(script, "filename", script) or "", getattr(script, "attributes", {}).get("body"))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
