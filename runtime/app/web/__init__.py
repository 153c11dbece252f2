"""The web console of dmf-run (`dmf-run --web [HOST:]PORT`, the `[web]` extra): live view, events, enrolment,
gallery, unknown inbox and controls in a browser, and the REST API the page uses (docs/web.md).

    settings.py      the address, token and TLS files, checked once; which Host names are the console's
    options.py       dmf-run's --web options and the function that starts the console
    console.py       WebConsole: uvicorn in a thread, serving the app below
    guard.py         every request first: Host, cross-origin, token, body size
    api.py           the routes (Starlette)
    output.py        WebOutput, the frame loop's output for the console; Tee, several outputs as one
    stream.py        the live view: overlay drawn and JPEG encoded once per frame, on its own thread
    hubs.py          frames and events handed from the loop's threads to the server's, never waiting
    gallery_view.py  the one module that reads the gallery (snapshots taken on the loop's thread)
    inbox.py         recent frames judged unknown
    uploads.py       uploaded images, bounded in bytes and pixels before decoding
    webhook.py       --webhook: recognition changes POSTed from a thread of their own
    static/          the page: index.html, console.js, console.css (no CDN, works offline)

Nothing here is imported by dmf-run unless --web or --webhook is given, except options.py and
settings.py (click and the standard library only).
"""
