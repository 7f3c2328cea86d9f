"""The run report: typed study results in, one self-contained HTML page and a Markdown twin out.

`build` gathers the inputs (runs, study results, model), `sections` render them, `document` holds the document
model and renders HTML/Markdown, `plots` holds the matplotlib helpers.
"""
