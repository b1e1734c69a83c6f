// A plain HTTP worker in Node.js for the soak's socket-mode app (`cargo xtask soak`): answers
// every request as ipcluster-demo does (`app=… generation=… band=… pid=… peer=…`), keeps
// connections alive, and takes its socket the socket-mode way: fd 3 (LISTEN_FDS), then READY=1
// through systemd-notify (Node has no Unix datagram sockets). Without LISTEN_FDS it listens on
// [::]:$PORT.
"use strict";
const http = require("http");
const { spawn } = require("child_process");

const env = process.env;
const id = `app=${env.IPCLUSTER_APP} generation=${env.IPCLUSTER_GENERATION} band=${env.IPCLUSTER_BAND} pid=${process.pid}`;
const server = http.createServer((req, res) => {
  const peer = (req.socket.remoteAddress || "").replace(/^::ffff:/, "");
  const body = `${id} peer=${peer}\n`;
  res.writeHead(200, { "content-type": "text/plain", "content-length": Buffer.byteLength(body) });
  res.end(body);
});
// Clients keep their connections for a minute or more between requests' bursts.
server.keepAliveTimeout = 120000;
const ready = () => {
  if (env.NOTIFY_SOCKET) spawn("systemd-notify", ["--ready"], { stdio: "ignore" });
};
if (env.LISTEN_FDS) {
  server.listen({ fd: 3 }, ready);
} else {
  server.listen(Number(env.PORT), "::", ready);
}
