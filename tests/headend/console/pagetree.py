"""The console's HTML as a tree, for tests that check a specific element (a table's row,
a cell) rather than a substring anywhere in the page. Standard library only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.walk()

    def text(self) -> str:
        """The text inside, whitespace collapsed; a ``<br>`` is a space."""
        parts: list[str] = []

        def collect(n: Node) -> None:
            for c in n.children:
                if isinstance(c, str):
                    parts.append(c)
                elif c.tag == "br":
                    parts.append(" ")
                else:
                    collect(c)

        collect(self)
        return " ".join("".join(parts).split())

    def by_id(self, ident: str) -> Node:
        found = [n for n in self.walk() if n.attrs.get("id") == ident]
        assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
        return found[0]

    def has_id(self, ident: str) -> bool:
        return any(n.attrs.get("id") == ident for n in self.walk())

    def all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [
            n for n in self.walk() if n.tag == tag and (cls is None or cls in n.attrs.get("class", "").split())
        ]

    def cell(self, cls: str) -> Node:
        """The one ``td`` of this row with the class ``cls``."""
        (td,) = self.all("td", cls)
        return td


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        for i in range(len(self.stack) - 1, 0, -1):  # close up to the matching open element
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


def rows(page: Node, table_id: str) -> dict[str, Node]:
    """The body rows of a table that carry an id, by id."""
    table = page.by_id(table_id)
    out: dict[str, Node] = {}
    for tbody in table.all("tbody"):
        for tr in tbody.all("tr"):
            if "id" in tr.attrs:
                assert tr.attrs["id"] not in out, f"row {tr.attrs['id']} twice in #{table_id}"
                out[tr.attrs["id"]] = tr
    return out


def body_rows(page: Node, table_id: str) -> list[Node]:
    """Every body row of a table, in order."""
    return [tr for tbody in page.by_id(table_id).all("tbody") for tr in tbody.all("tr")]
