"""GET /docs: Swagger UI over /openapi.json. Its assets come from the installed `swagger-ui-bundle` package
and are served by the router itself (no CDN: the machine may be offline)."""

from __future__ import annotations

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from spindle_router.errors import ApiError

ASSETS = {  # the files the page loads, and nothing else of the package
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui-standalone-preset.js": "application/javascript",
    "favicon-32x32.png": "image/png",
}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Spindle API</title>
  <link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="/docs/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>
    window.onload = function () {
      window.ui = SwaggerUIBundle({
        url: "/openapi.json",
        dom_id: "#swagger-ui",
        deepLinking: true,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        layout: "StandaloneLayout",
      });
    };
  </script>
</body>
</html>
"""


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no such documentation asset: {name}")
    path = swagger_ui_path / name
    return web.Response(body=path.read_bytes(), content_type=ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400"})
