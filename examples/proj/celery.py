"""The seed's project, with only the module name changed (celery -> celeriac).

No broker is given, so the embedded SQLite broker is used: nothing to install or start.
Results go to an SQLite file. CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND override both.
"""

from celeriac import Celeriac

app = Celeriac(
    "proj",
    backend="sqlite:///celeriac-results.db",
    include=["proj.tasks"],
)

# Optional configuration, see the application user guide.
app.conf.update(
    result_expires=3600,
)


if __name__ == "__main__":
    app.start()
