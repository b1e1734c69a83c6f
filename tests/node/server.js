// A Socket.IO worker for the session tests: keeps per-client state in its process (the
// session), long-polling only, and says who it is. In NAT mode it listens on [::]:$PORT
// (dual-stack); in socket mode on the socket it was handed at fd 3, then tells systemd-notify.
"use strict";
const http = require("http");
const { spawn } = require("child_process");
const { Server } = require("socket.io");

const me = {
  generation: Number(process.env.IPCLUSTER_GENERATION),
  band: Number(process.env.IPCLUSTER_BAND),
  pid: process.pid,
};
const server = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    res.writeHead(200);
    return res.end("ok\n");
  }
  if (req.url === "/who") {
    res.writeHead(200, { "content-type": "application/json" });
    return res.end(JSON.stringify({ ...me, peer: req.socket.remoteAddress }) + "\n");
  }
  res.writeHead(404);
  res.end();
});
const io = new Server(server, { transports: ["polling"], cors: { origin: "*" } });
// Why a request or a session failed, on this side (the journal of the worker's scope): a poll
// of a session this worker does not hold, a session closed by a transport error or a timeout.
const peer = (req) => (req && req.socket ? req.socket.remoteAddress : "?");
io.engine.on("connection_error", (e) =>
  console.error(`engine.io: ${e.message} (code ${e.code}) from ${peer(e.req)}: ${String(e.req && e.req.url).slice(0, 80)}`),
);
io.on("connection", (socket) => {
  const from = socket.handshake.address;
  socket.on("disconnect", (reason) => {
    if (reason !== "client namespace disconnect" && reason !== "server shutting down") {
      console.error(`socket.io: the session of ${from} ended: ${reason}`);
    }
  });
  let count = 0;
  socket.emit("hello", { ...me, peer: socket.handshake.address });
  socket.on("tick", (n, ack) => {
    count += 1;
    ack({ n, count, ...me });
  });
});
const ready = () => {
  if (process.env.NOTIFY_SOCKET) spawn("systemd-notify", ["--ready"], { stdio: "ignore" });
};
if (process.env.LISTEN_FDS) {
  server.listen({ fd: 3 }, ready);
} else {
  server.listen(Number(process.env.PORT), "::", ready);
}
