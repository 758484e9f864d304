"""Build a notebook from a '# %%' script: python mknb.py SRC.py DST.ipynb"""
import re
import sys

import nbformat

src, dst = sys.argv[1:3]
cells = []
for block in re.split(r"^# %%", open(src).read(), flags=re.M)[1:]:
    head, _, body = block.partition("\n")
    body = body.strip("\n")
    if "[markdown]" in head:
        text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
        cells.append(nbformat.v4.new_markdown_cell(text))
    else:
        cell = nbformat.v4.new_code_cell(body)
        if "parameters" in head:
            cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
nb = nbformat.v4.new_notebook(cells=cells)
nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
               "language_info": {"name": "python"}}
nbformat.write(nb, dst)
