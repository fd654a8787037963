"""`rapiddiff serve`: an HTTP image service (OpenAI Images API) that batches concurrent requests on one pipeline.

    rapiddiff serve --model ./sd15 --max-batch-size 8 --batch-wait-ms 20

- `schemas`: the request body, checked before anything is queued; errors name the field and what is allowed.
- `batcher`: one worker thread owns the pipeline and runs queued requests whose shape-deciding settings match as one
  call (`BatchKey`), one generator per image, so an image depends on its seed only.
- `app`: the FastAPI app (endpoints, timeouts, client disconnects, metrics); `cli`: the command and its drain on SIGTERM.
- `setup`: how the served pipeline is made (load, then the options that change it, such as --compile).
- `ray_engine`: `--engine ray --replicas N`, the same app on Ray Serve replicas (`pip install 'rapiddiff[ray]'`).

See docs/serve.md. Needs `pip install 'rapiddiff[serve]'` (FastAPI, uvicorn, prometheus-client).
"""
