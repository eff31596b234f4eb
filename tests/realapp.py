"""A FastAPI app of ordinary size for the heap tests and benchmark: routers, models, state.

About forty routes over six routers, two dozen pydantic models (nested, validated,
enums, defaults), a middleware, dependencies, and an in-memory store that holds a
few thousand model instances, as a small service does after some traffic. pprof is
mounted at ``/debug/pprof``. ``python -m uvicorn tests.realapp:app`` serves it;
``REALAPP_TRACEMALLOC=N`` makes the pprof app start tracemalloc with N frames.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator, model_validator

from asgi_pprof import create_app

# --- models -------------------------------------------------------------------------------


class Role(enum.StrEnum):
    admin = "admin"
    member = "member"
    guest = "guest"


class Status(enum.StrEnum):
    open = "open"
    in_progress = "in_progress"
    done = "done"
    archived = "archived"


class Currency(enum.StrEnum):
    eur = "EUR"
    usd = "USD"
    gbp = "GBP"


class Address(BaseModel):
    street: str
    city: str
    postcode: str = Field(min_length=3, max_length=12)
    country: str = "DE"


class Money(BaseModel):
    amount_cents: int = Field(ge=0)
    currency: Currency = Currency.eur


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=80)
    email: str
    role: Role = Role.member
    address: Address | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("email")
    @classmethod
    def email_has_at(cls, v: str) -> str:
        if "@" not in v:
            raise ValueError("email needs an @")
        return v.lower()


class User(UserIn):
    id: int
    created: dt.datetime
    active: bool = True


class UserPatch(BaseModel):
    name: str | None = None
    role: Role | None = None
    active: bool | None = None


class Team(BaseModel):
    id: int
    name: str
    members: list[int] = Field(default_factory=list)
    lead: int | None = None


class TeamIn(BaseModel):
    name: str
    lead: int | None = None


class Comment(BaseModel):
    id: int
    author: int
    body: str
    created: dt.datetime


class TaskIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    description: str = ""
    status: Status = Status.open
    assignee: int | None = None
    estimate_hours: float | None = Field(default=None, ge=0, le=1000)
    labels: list[str] = Field(default_factory=list)


class Task(TaskIn):
    id: int
    project: int
    comments: list[Comment] = Field(default_factory=list)
    created: dt.datetime
    updated: dt.datetime


class TaskPatch(BaseModel):
    title: str | None = None
    status: Status | None = None
    assignee: int | None = None


class Project(BaseModel):
    id: int
    name: str
    team: int
    budget: Money
    archived: bool = False


class ProjectIn(BaseModel):
    name: str
    team: int
    budget: Money


class LineItem(BaseModel):
    sku: str
    quantity: int = Field(ge=1)
    unit_price: Money


class InvoiceIn(BaseModel):
    customer: int
    items: list[LineItem] = Field(min_length=1)
    billing: Address
    note: str | None = None

    @model_validator(mode="after")
    def one_currency(self) -> InvoiceIn:
        if len({i.unit_price.currency for i in self.items}) > 1:
            raise ValueError("one currency per invoice")
        return self


class Invoice(InvoiceIn):
    id: str
    total: Money
    issued: dt.datetime
    paid: bool = False


class Page(BaseModel):
    offset: int
    limit: int
    total: int


class UserPage(BaseModel):
    page: Page
    items: list[User]


class TaskPage(BaseModel):
    page: Page
    items: list[Task]


class SearchHit(BaseModel):
    kind: str
    id: str
    score: float


class SearchResult(BaseModel):
    query: str
    hits: list[SearchHit]


class Health(BaseModel):
    status: str
    users: int
    tasks: int
    invoices: int


class Report(BaseModel):
    project: int
    by_status: dict[Status, int]
    hours: float


class Event(BaseModel):
    kind: str
    at: dt.datetime
    data: dict[str, Any] = Field(default_factory=dict)


# --- the store ----------------------------------------------------------------------------


class Store:
    """What a small service keeps in memory after a while: a few thousand models."""

    def __init__(self) -> None:
        self.users: dict[int, User] = {}
        self.teams: dict[int, Team] = {}
        self.projects: dict[int, Project] = {}
        self.tasks: dict[int, Task] = {}
        self.invoices: dict[str, Invoice] = {}
        self.events: list[Event] = []

    def seed(self, users: int = 300, tasks: int = 2000) -> None:
        now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        for i in range(users):
            self.users[i] = User(
                id=i,
                name=f"user {i}",
                email=f"u{i}@example.com",
                role=Role.member if i % 7 else Role.admin,
                address=Address(street=f"{i} Main St", city="Berlin", postcode=f"{10000 + i}"),
                tags=[f"t{i % 5}", "seed"],
                created=now,
            )
        for t in range(10):
            self.teams[t] = Team(id=t, name=f"team {t}", members=list(range(t, users, 10)), lead=t)
            self.projects[t] = Project(
                id=t, name=f"project {t}", team=t, budget=Money(amount_cents=100_000 * (t + 1))
            )
        for i in range(tasks):
            self.tasks[i] = Task(
                id=i,
                project=i % 10,
                title=f"task {i}",
                description="do the thing " * (i % 4),
                status=list(Status)[i % 4],
                assignee=i % users,
                estimate_hours=float(i % 13),
                labels=["seed", f"l{i % 3}"],
                comments=[
                    Comment(id=j, author=(i + j) % users, body=f"comment {j} on {i}", created=now)
                    for j in range(i % 3)
                ],
                created=now,
                updated=now,
            )

    def log(self, kind: str, **data: Any) -> None:
        self.events.append(Event(kind=kind, at=dt.datetime.now(dt.UTC), data=data))
        del self.events[:-500]  # bounded, as a real ring buffer would be


store = Store()


def get_store() -> Store:
    return store


StoreDep = Annotated[Store, Depends(get_store)]


def paging(offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)) -> tuple[int, int]:
    return offset, limit


Paging = Annotated[tuple[int, int], Depends(paging)]


def caller(x_user: Annotated[int | None, Header()] = None) -> int | None:
    return x_user


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- routers ------------------------------------------------------------------------------

users = APIRouter(prefix="/users", tags=["users"])


@users.get("", response_model=UserPage)
def list_users(s: StoreDep, p: Paging, role: Role | None = None) -> UserPage:
    rows = [u for u in s.users.values() if role is None or u.role == role]
    off, lim = p
    return UserPage(page=Page(offset=off, limit=lim, total=len(rows)), items=rows[off : off + lim])


@users.post("", response_model=User, status_code=201)
def create_user(body: UserIn, s: StoreDep) -> User:
    uid = max(s.users, default=-1) + 1
    s.users[uid] = User(id=uid, created=_now(), **body.model_dump())
    s.log("user.created", id=uid)
    return s.users[uid]


@users.get("/{uid}", response_model=User)
def get_user(uid: int, s: StoreDep) -> User:
    if uid not in s.users:
        raise HTTPException(404, "no such user")
    return s.users[uid]


@users.patch("/{uid}", response_model=User)
def patch_user(uid: int, body: UserPatch, s: StoreDep) -> User:
    u = get_user(uid, s)
    s.users[uid] = u.model_copy(update=body.model_dump(exclude_none=True))
    return s.users[uid]


@users.delete("/{uid}", status_code=204)
def delete_user(uid: int, s: StoreDep) -> None:
    s.users.pop(uid, None)


@users.get("/{uid}/tasks", response_model=list[Task])
def user_tasks(uid: int, s: StoreDep) -> list[Task]:
    return [t for t in s.tasks.values() if t.assignee == uid][:50]


@users.get("/{uid}/teams", response_model=list[Team])
def user_teams(uid: int, s: StoreDep) -> list[Team]:
    return [t for t in s.teams.values() if uid in t.members]


teams = APIRouter(prefix="/teams", tags=["teams"])


@teams.get("", response_model=list[Team])
async def list_teams(s: StoreDep) -> list[Team]:
    return list(s.teams.values())


@teams.post("", response_model=Team, status_code=201)
async def create_team(body: TeamIn, s: StoreDep) -> Team:
    tid = max(s.teams, default=-1) + 1
    s.teams[tid] = Team(id=tid, name=body.name, lead=body.lead)
    return s.teams[tid]


@teams.get("/{tid}", response_model=Team)
async def get_team(tid: int, s: StoreDep) -> Team:
    if tid not in s.teams:
        raise HTTPException(404, "no such team")
    return s.teams[tid]


@teams.post("/{tid}/members/{uid}", response_model=Team)
async def add_member(tid: int, uid: int, s: StoreDep) -> Team:
    team = await get_team(tid, s)
    if uid not in team.members:
        team.members.append(uid)
    return team


@teams.delete("/{tid}/members/{uid}", response_model=Team)
async def remove_member(tid: int, uid: int, s: StoreDep) -> Team:
    team = await get_team(tid, s)
    team.members = [m for m in team.members if m != uid]
    return team


projects = APIRouter(prefix="/projects", tags=["projects"])


@projects.get("", response_model=list[Project])
async def list_projects(s: StoreDep, archived: bool = False) -> list[Project]:
    return [p for p in s.projects.values() if p.archived == archived]


@projects.post("", response_model=Project, status_code=201)
async def create_project(body: ProjectIn, s: StoreDep) -> Project:
    pid = max(s.projects, default=-1) + 1
    s.projects[pid] = Project(id=pid, **body.model_dump())
    return s.projects[pid]


@projects.get("/{pid}", response_model=Project)
async def get_project(pid: int, s: StoreDep) -> Project:
    if pid not in s.projects:
        raise HTTPException(404, "no such project")
    return s.projects[pid]


@projects.post("/{pid}/archive", response_model=Project)
async def archive_project(pid: int, s: StoreDep) -> Project:
    p = await get_project(pid, s)
    p.archived = True
    return p


@projects.get("/{pid}/tasks", response_model=TaskPage)
async def project_tasks(pid: int, s: StoreDep, p: Paging, status: Status | None = None) -> TaskPage:
    rows = [
        t for t in s.tasks.values() if t.project == pid and (status is None or t.status == status)
    ]
    off, lim = p
    return TaskPage(page=Page(offset=off, limit=lim, total=len(rows)), items=rows[off : off + lim])


@projects.post("/{pid}/tasks", response_model=Task, status_code=201)
async def create_task(pid: int, body: TaskIn, s: StoreDep) -> Task:
    tid = max(s.tasks, default=-1) + 1
    now = _now()
    s.tasks[tid] = Task(id=tid, project=pid, created=now, updated=now, **body.model_dump())
    s.log("task.created", id=tid, project=pid)
    return s.tasks[tid]


@projects.get("/{pid}/report", response_model=Report)
async def project_report(pid: int, s: StoreDep) -> Report:
    counts = dict.fromkeys(Status, 0)
    hours = 0.0
    for t in s.tasks.values():
        if t.project == pid:
            counts[t.status] += 1
            hours += t.estimate_hours or 0.0
    return Report(project=pid, by_status=counts, hours=hours)


tasks = APIRouter(prefix="/tasks", tags=["tasks"])


@tasks.get("/{tid}", response_model=Task)
async def get_task(tid: int, s: StoreDep) -> Task:
    if tid not in s.tasks:
        raise HTTPException(404, "no such task")
    return s.tasks[tid]


@tasks.patch("/{tid}", response_model=Task)
async def patch_task(tid: int, body: TaskPatch, s: StoreDep) -> Task:
    t = await get_task(tid, s)
    s.tasks[tid] = t.model_copy(update={**body.model_dump(exclude_none=True), "updated": _now()})
    return s.tasks[tid]


@tasks.delete("/{tid}", status_code=204)
async def delete_task(tid: int, s: StoreDep) -> None:
    s.tasks.pop(tid, None)


@tasks.post("/{tid}/comments", response_model=Comment, status_code=201)
async def add_comment(
    tid: int, s: StoreDep, body: dict[str, str], who: Annotated[int | None, Depends(caller)]
) -> Comment:
    t = await get_task(tid, s)
    c = Comment(id=len(t.comments), author=who or 0, body=body.get("body", ""), created=_now())
    t.comments.append(c)
    return c


@tasks.get("/{tid}/comments", response_model=list[Comment])
async def list_comments(tid: int, s: StoreDep) -> list[Comment]:
    return (await get_task(tid, s)).comments


@tasks.post("/bulk", response_model=list[Task])
async def bulk_status(ids: list[int], status: Status, s: StoreDep) -> list[Task]:
    out = []
    for tid in ids:
        if tid in s.tasks:
            s.tasks[tid] = s.tasks[tid].model_copy(update={"status": status})
            out.append(s.tasks[tid])
    return out


billing = APIRouter(prefix="/invoices", tags=["billing"])


@billing.post("", response_model=Invoice, status_code=201)
def create_invoice(body: InvoiceIn, s: StoreDep) -> Invoice:
    cur = body.items[0].unit_price.currency
    total = sum(i.quantity * i.unit_price.amount_cents for i in body.items)
    inv = Invoice(
        id=str(uuid.uuid4()),
        total=Money(amount_cents=total, currency=cur),
        issued=_now(),
        **body.model_dump(),
    )
    s.invoices[inv.id] = inv
    return inv


@billing.get("", response_model=list[Invoice])
def list_invoices(s: StoreDep, paid: bool | None = None) -> list[Invoice]:
    return [i for i in s.invoices.values() if paid is None or i.paid == paid][:100]


@billing.get("/{iid}", response_model=Invoice)
def get_invoice(iid: str, s: StoreDep) -> Invoice:
    if iid not in s.invoices:
        raise HTTPException(404, "no such invoice")
    return s.invoices[iid]


@billing.post("/{iid}/pay", response_model=Invoice)
def pay_invoice(iid: str, s: StoreDep) -> Invoice:
    inv = get_invoice(iid, s)
    inv.paid = True
    return inv


misc = APIRouter(tags=["misc"])


@misc.get("/health", response_model=Health)
async def health(s: StoreDep) -> Health:
    return Health(status="ok", users=len(s.users), tasks=len(s.tasks), invoices=len(s.invoices))


@misc.get("/search", response_model=SearchResult)
async def search(q: Annotated[str, Query(min_length=1)], s: StoreDep) -> SearchResult:
    hits = [
        SearchHit(kind="user", id=str(u.id), score=1.0) for u in s.users.values() if q in u.name
    ]
    hits += [
        SearchHit(kind="task", id=str(t.id), score=0.5) for t in s.tasks.values() if q in t.title
    ]
    return SearchResult(query=q, hits=hits[:50])


@misc.get("/events", response_model=list[Event])
async def events(s: StoreDep, limit: int = 50) -> list[Event]:
    return s.events[-limit:]


@misc.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@misc.get("/export/tasks")
def export_tasks(s: StoreDep) -> JSONResponse:
    return JSONResponse([t.model_dump(mode="json") for t in list(s.tasks.values())[:500]])


def _chunks(n: int) -> Iterator[list[int]]:
    for i in range(0, n, 100):
        yield list(range(i, min(n, i + 100)))


@misc.get("/stats/chunks")
async def chunk_stats(n: int = 1000) -> dict[str, int]:
    return {"chunks": sum(1 for _ in _chunks(n))}


# --- the app ------------------------------------------------------------------------------


async def request_id(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers["x-request-id"] = uuid.uuid4().hex
    return response


def make_app(tracemalloc_frames: int = 0, seed_tasks: int = 2000) -> FastAPI:
    """Return a fresh app: routers, middleware, OpenAPI schema built, store seeded, pprof."""
    app = FastAPI(title="realapp", version="1.0")
    app.middleware("http")(request_id)
    for router in (users, teams, projects, tasks, billing, misc):
        app.include_router(router)
    store.__init__()  # type: ignore[misc]
    store.seed(tasks=seed_tasks)
    app.openapi()  # what the first /docs visit builds: the schema of every model
    app.mount("/debug/pprof", create_app(tracemalloc_frames=tracemalloc_frames))
    return app


app = make_app(int(os.environ.get("REALAPP_TRACEMALLOC", "0")))

# A few requests of each kind, as after a little traffic (warms FastAPI's caches).
WARM_PATHS = [
    "/users?limit=50",
    "/users/3",
    "/users/3/tasks",
    "/teams",
    "/projects/1/tasks?limit=100",
    "/projects/2/report",
    "/tasks/5",
    "/search?q=1",
    "/health",
    "/export/tasks",
]
