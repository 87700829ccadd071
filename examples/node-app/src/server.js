// A tiny HTTP server for examples/node-app.kdl.
const http = require("node:http");
const port = Number(process.env.PORT || 3000);
http
  .createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end(`hello from ${process.env.HOSTNAME || "a specc VM"}\n`);
  })
  .listen(port, () => console.log(`listening on ${port}`));
