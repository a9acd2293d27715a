"""
The chat session that sample.py --chat and the server share, and an OpenAI-compatible HTTP server with a chat page,
from the standard library alone (python sample.py --serve=8000, then open http://127.0.0.1:8000/):
    POST /v1/chat/completions   OpenAI's request (messages, max_tokens, temperature, top_p, stop, stream, seed) and
                                answer; stream=true answers with server-sent events: `data: {chunk}` ... `data: [DONE]`
    GET  /v1/models, /health    the one model served; {"status": "ok", ...}, also while a generation runs
    GET  /                      chat.html, a chat page that needs no network
One model, one KV cache: generations run one at a time, QUEUE_SIZE requests wait, more get 503. There is no
authentication, and any web page the user opens can send requests to 127.0.0.1 too, so the server answers only its
own page and clients: JSON POSTs (415), no other origin unless --allow_origin names it (403), no Host but this
machine's names, unless bound to 0.0.0.0 or :: (421: DNS rebinding). The body, the stop strings, the reply and the
open connections are bounded; replies name the model, never a path.
"""
import codecs
import json
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from configurator import die
from tokenizer import fit_chat, response_end_id

QUEUE_SIZE = 8  # requests that may wait for the model; more get 503 at once instead of piling up threads
MAX_CONNECTIONS = 32  # open connections (a thread each); more get 503 at once
MAX_BODY = 1 << 20  # bytes; a conversation that fills an 8k-token context is ~32 KB of text
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings per request, and their length: the text held back per token
STALL_TIMEOUT = 5  # seconds a client may stop reading a stream before it counts as gone (it holds the model)
LOCAL_NAMES = ('localhost', '127.0.0.1', '[::1]')
PAGE = Path(__file__).with_name('chat.html')
# the page fetches from this server only (it needs no network), and no other page may frame it (clickjacking)
PAGE_POLICY = ("default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'self' data:; "
               "frame-ancestors 'none'")


class ApiError(Exception):
    """Answered with `status` and OpenAI's error body {"error": {"message": ..., "type": ..., "code": ...}}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """Raised from generate's on_token once the client has hung up: generate has no stop flag, an exception ends it."""


class StopText(Exception):
    """Raised from on_token once the reply holds one of the request's stop strings."""


# -------------------------------------------------------------------- the request

def get_field(req, key, kinds, default, valid, expected):
    """req[key] if it is of `kinds` and valid(value), default if absent; ApiError(400) otherwise."""
    value = req.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or not valid(value):
        raise ApiError(400, f"'{key}' must be {expected}, not {json.dumps(value)[:40]}")
    return value


def check_message(message, i):
    """{'role', 'content'} with content as text; OpenAI's list of text parts is joined, 'developer' is 'system'."""
    if not isinstance(message, dict) or message.get('role') not in ('system', 'developer', 'user', 'assistant'):
        raise ApiError(400, f"messages[{i}] must be {{\"role\": \"system\" | \"user\" | \"assistant\", "
                            f"\"content\": text}}")
    content = message.get('content')
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get('text'), str) for p in content):
        content = ''.join(p['text'] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be text")
    return {'role': 'system' if message['role'] == 'developer' else message['role'], 'content': content}


def check_request(body, defaults):
    """A chat completion's settings from its JSON body (sample.py's where it has none); ApiError(400) if wrong."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # a JSONDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise ApiError(400, 'the body must be a JSON object: {"messages": [{"role": "user", "content": "Hi"}]}')
    messages = req.get('messages')
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
    number, count = (int, float), (int,)
    stop = get_field(req, 'stop', (str, list), [], lambda v: 0 < len(v) <= MAX_STOP_CHARS if isinstance(v, str) else (
        len(v) <= MAX_STOPS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in v)),
        f'a string or a list of up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters')
    get_field(req, 'n', count, 1, lambda v: v == 1, '1 (one reply per request)')
    max_tokens = get_field(req, 'max_completion_tokens', count, defaults['max_new_tokens'], lambda v: v > 0,
                           'a positive whole number')
    return {'messages': [check_message(m, i) for i, m in enumerate(messages)],
            'max_tokens': get_field(req, 'max_tokens', count, max_tokens, lambda v: v > 0, 'a positive whole number'),
            'temperature': get_field(req, 'temperature', number, defaults['temperature'], lambda v: v >= 0,
                                     'a number >= 0 (0 = greedy)'),
            'top_p': get_field(req, 'top_p', number, defaults['top_p'], lambda v: 0 < v <= 1, 'a number in (0, 1]'),
            'top_k': get_field(req, 'top_k', count, defaults['top_k'], lambda v: v >= 0, 'a whole number >= 0'),
            'seed': get_field(req, 'seed', count, None, lambda v: -2**63 <= v < 2**64, 'a 64-bit whole number'),
            'stream': get_field(req, 'stream', (bool,), False, lambda v: True, 'true or false'),
            'stop': [stop] if isinstance(stop, str) else stop}


# -------------------------------------------------------------------- the chat session

class TextStream:
    """Token ids -> pieces of text for emit(text): a UTF-8 character split across tokens is sent once whole, and
    text that could be the start of a stop string is held back until it cannot (a stop string is never sent).
    Only the held-back text is searched, so a token costs as much at the end of a long reply as at its start."""

    def __init__(self, tokenizer, stop, emit):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self.sent, self.held = [], ''  # the pieces emitted; the text after them, not emitted yet

    @property
    def text(self):
        return ''.join(self.sent)

    def add(self, token_id):
        """Take one token; StopText once a stop string appears (the text ends before it)."""
        self.held += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            self.send(min(found))
            raise StopText
        # keep back the longest end of the text that a stop string begins with
        keep = max((n for s in self.stop for n in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:n])), default=0)
        self.send(len(self.held) - keep)

    def send(self, n):
        """Emit the first n held characters."""
        if n > 0:
            piece, self.held = self.held[:n], self.held[n:]
            self.sent.append(piece)
            self.emit(piece)

    def finish(self):
        """The rest: held text that no stop string followed, and an incomplete last character (as U+FFFD)."""
        self.held += self.decoder.decode(b'', final=True)
        self.send(len(self.held))


class ChatSession:
    """One model talking, for sample.py --chat and the server alike: a conversation in the model's chat template,
    cropped to the context, and one KV cache kept between turns. Each turn resends the whole conversation (as HTTP
    clients do), and only what the cache lacks is computed."""

    def __init__(self, model, tokenizer, style, device, chat_context=8192, system='', decode_step=None):
        self.model, self.tokenizer, self.style, self.device = model, tokenizer, style, device
        self.system = system  # opens every conversation that has no system message of its own
        self.decode_step = decode_step  # sample.py --compile=True: the compiled one-token step (else None: eager)
        self.end_id = response_end_id(tokenizer, style)
        self.capacity = min(model.config.block_size, chat_context)
        self.cache = model.new_kv_cache(1, self.capacity, torch.device(device))  # in the dtype attention computes in
        self.cached = []  # the token ids the cache holds

    def reset(self):
        self.cache.restart()
        self.cached = []

    def fit(self, messages, max_tokens):
        """(token ids, reply length, messages dropped, notice or None): the conversation in the chat template, its
        oldest messages after the system one dropped until it fits beside a reply of at most half the context."""
        if self.system and messages[0]['role'] != 'system':
            messages = [{'role': 'system', 'content': self.system}] + messages
        reply_tokens = min(max_tokens, self.capacity // 2)
        ids, dropped, cut = fit_chat(messages, self.tokenizer, self.style, self.capacity - reply_tokens)
        notice = None
        if dropped or cut:
            notice = (f"the conversation is longer than the context ({self.capacity} tokens, {reply_tokens} of them "
                      f"kept for the reply): dropped its {dropped} oldest messages"
                      + ("; the last message alone is too long: kept its end" if cut else ""))
        return ids, reply_tokens, dropped, notice

    def reply(self, ids, reply_tokens, emit, temperature, top_k, top_p, stop=(), seed=None, gone=None):
        """(text, finish_reason, completion tokens) of the reply to `ids`, its text passed to emit(piece) as it comes;
        it ends at the end of turn, a stop string, reply_tokens, or with ClientGone once gone() says the client left."""
        common = next((i for i, (a, b) in enumerate(zip(self.cached, ids)) if a != b), min(len(self.cached), len(ids)))
        self.cache.truncate(common)  # what the cache holds beyond the shared start is overwritten
        stream, new = TextStream(self.tokenizer, stop, emit), []
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        gone = gone or (lambda: False)

        def on_token(next_id):
            new.append(int(next_id[0]))
            if new[-1] != self.end_id:
                stream.add(new[-1])
            if gone():  # checked every token: a stopped page or a dropped connection frees the model at once
                raise ClientGone
        finish = 'length'
        try:
            if gone():  # it left while waiting in the queue
                raise ClientGone
            with torch.no_grad():
                self.model.generate(torch.tensor([ids], device=self.device), reply_tokens, temperature=temperature,
                                    top_k=top_k or None, top_p=top_p, eos_id=self.end_id, kv_cache=self.cache,
                                    on_token=on_token, generator=generator, decode_step=self.decode_step)
            stream.finish()
        except StopText:
            finish = 'stop'
        except (ClientGone, ConnectionError, TimeoutError):  # raised from on_token: the cache is whole
            print(f"the client left after {len(new)} tokens; generation stopped", file=sys.stderr, flush=True)
            raise ClientGone from None
        except BaseException:  # the cache may hold half a step: forget it
            self.reset()
            raise
        # the prompt fits in the cache with the reply, so its window never slid: it holds (ids + new)'s start
        self.cached = (ids + new)[:self.cache.filled]
        if new and new[-1] == self.end_id:
            finish = 'stop'
        return stream.text, finish, len(new)


# -------------------------------------------------------------------- HTTP

def completion(cid, created, name, text, finish, usage, notice):
    body = {'id': cid, 'object': 'chat.completion', 'created': created, 'model': name,
            'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': finish}],
            'usage': usage}
    return {**body, 'notice': notice} if notice else body


def chunk(cid, created, name, delta, finish=None, **extra):
    return {'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': name,
            'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}], **extra}


def error_body(message):
    return {'error': {'message': message, 'type': 'invalid_request_error', 'code': None}}


class Handler(BaseHTTPRequestHandler):
    """One request, in its own thread; self.server is the Server (its session, page and allowed names)."""
    server_version = 'gpt-from-scratch'
    timeout = 60  # seconds: a client that stops sending frees its thread
    streaming = False

    def log_message(self, format, *args):
        print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unknown method) as JSON too."""
        self.close_connection = True
        self.send_json(code, error_body(message or self.responses.get(code, ('error',))[0]))

    def send_head(self, status, headers):
        """The status line and headers, with CORS headers for an allowed origin."""
        self.send_response(status)
        for key, value in (*headers, *self.cors_headers()):
            self.send_header(key, value)
        self.end_headers()

    def send_json(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_head(status, [('Content-Type', 'application/json'), ('Content-Length', str(len(data))), *headers])
        self.wfile.write(data)

    def cors_headers(self):
        origin = self.headers.get('Origin') if hasattr(self, 'headers') else None  # (none before a request parses)
        allowed = origin in self.server.allowed_origins
        return [('Access-Control-Allow-Origin', origin), ('Vary', 'Origin')] if allowed else []

    def check_caller(self):
        """421 for a Host that is not this server's (a page under another name: DNS rebinding), 403 for a page of
        another origin (a browser sends any page's simple POST without asking first)."""
        host = (self.headers.get('Host') or '').lower()
        name = host.rsplit(':', 1)[0] if not host.endswith(']') else host  # [::1]:8000 -> [::1]
        if self.server.allowed_hosts is not None and name not in self.server.allowed_hosts:
            raise ApiError(421, f"this server answers to {', '.join(self.server.allowed_hosts)}, not {name[:60]!r}")
        origin = self.headers.get('Origin')
        if origin is not None and origin.lower() != f'http://{host}' and origin not in self.server.allowed_origins:
            raise ApiError(403, f"requests from pages of {origin[:60]} are refused; to allow them, start the server "
                                f"with --allow_origin={origin[:60]}")

    def route(self):
        routes = {'/': {'GET': self.page}, '/health': {'GET': self.health}, '/v1/models': {'GET': self.models},
                  '/v1/chat/completions': {'POST': self.completions}}
        path = urlsplit(self.path).path
        methods = routes.get(path if path == '/' else path.rstrip('/'))
        try:
            self.check_caller()
            if self.command == 'OPTIONS' and self.cors_headers():  # an allowed origin's preflight
                self.send_head(204, [('Access-Control-Allow-Methods', 'GET, POST'),
                                     ('Access-Control-Allow-Headers', 'Content-Type, Authorization')])
                return
            if methods is None:
                raise ApiError(404, f"no {path[:60]} here; try POST /v1/chat/completions, GET /v1/models, /health or /")
            if self.command not in methods:
                self.send_json(405, error_body(f"{self.command} {path[:60]}: use {', '.join(methods)}"),
                               [('Allow', ', '.join(methods))])
                return
            methods[self.command]()
        except ApiError as e:
            self.refuse(e)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug, or the model failing: log it whole, answer without the details, keep serving
            traceback.print_exc()
            self.close_connection = True
            if not self.streaming:  # a stream's headers are out: ending it early is all that is left
                self.send_json(500, error_body("generation failed; the server's log says why"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def refuse(self, error):
        """Answer an ApiError and close: a body we did not read may follow. A client still sending one hears the
        status if we read it away briefly before closing (closing on unread data resets the connection)."""
        self.close_connection = True
        self.send_json(error.status, error_body(str(error)))
        if self.command == 'POST':
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.2)
                deadline = time.time() + 1
                while time.time() < deadline and self.connection.recv(65536):
                    pass
            except OSError:
                pass

    def page(self):
        html = self.server.page
        self.send_head(200, [('Content-Type', 'text/html; charset=utf-8'), ('Content-Length', str(len(html))),
                             ('Content-Security-Policy', PAGE_POLICY)])
        self.wfile.write(html)

    def health(self):
        self.send_json(200, self.server.health())

    def models(self):
        self.send_json(200, {'object': 'list', 'data': [{'id': self.server.name, 'object': 'model',
                                                          'created': 0, 'owned_by': 'local'}]})

    def read_body(self):
        """The JSON body; 415 for another kind (a page's form or text/plain POST, which a browser sends anywhere)."""
        kind = (self.headers.get('Content-Type') or '').split(';')[0].strip().lower()
        if kind != 'application/json':
            raise ApiError(415, f"send the body as JSON (Content-Type: application/json), not {kind[:40]!r}")
        length = self.headers.get('Content-Length')
        if length is None or not length.isdigit():
            raise ApiError(411 if length is None else 400, "send the JSON body with a Content-Length header")
        if int(length) > MAX_BODY:  # said by the header: refused before a byte of it is read
            raise ApiError(413, f"the body is {int(length):,} bytes; at most {MAX_BODY:,} are accepted")
        return self.rfile.read(int(length))

    def client_gone(self):
        """True once the client has closed the connection: it sends nothing after its request, so a socket
        that turns readable has reached end-of-file (select works on sockets on every platform)."""
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def completions(self):
        req = check_request(self.read_body(), self.server.defaults)
        cid, created, t0 = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), time.time()
        with self.server.turn():
            self.connection.settimeout(STALL_TIMEOUT)  # a client that stops reading must not hold the model
            ids, reply_tokens, _, notice = self.server.session.fit(req['messages'], req['max_tokens'])
            if notice:
                print(f"notice: {notice}", file=sys.stderr, flush=True)
            if req['stream']:
                finish, usage = self.stream(req, ids, reply_tokens, notice, cid, created)
            else:
                text, finish, usage = self.reply(req, ids, reply_tokens, lambda piece: None)
                self.send_json(200, completion(cid, created, self.server.name, text, finish, usage, notice))
        n, dt = usage['completion_tokens'], time.time() - t0
        print(f"generated {n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s; prompt {len(ids)} tokens, "
              f"finish: {finish})", file=sys.stderr, flush=True)

    def reply(self, req, ids, reply_tokens, emit):
        """The session's reply to a checked request, its text passed to emit as it comes: (text, finish, usage)."""
        text, finish, n = self.server.session.reply(ids, reply_tokens, emit, req['temperature'], req['top_k'],
                                                    req['top_p'], req['stop'], req['seed'], self.client_gone)
        return text, finish, {'prompt_tokens': len(ids), 'completion_tokens': n, 'total_tokens': len(ids) + n}

    def stream(self, req, ids, reply_tokens, notice, cid, created):
        """Server-sent events: one `data: {chunk}` per piece of text, then the finish reason, then [DONE]."""
        name = self.server.name
        self.send_head(200, [('Content-Type', 'text/event-stream'), ('Cache-Control', 'no-cache')])
        self.streaming = True
        self.close_connection = True  # the stream ends when the connection does (no Content-Length)

        def send(body):
            self.wfile.write(b'data: ' + (body if isinstance(body, bytes) else json.dumps(body).encode()) + b'\n\n')
            self.wfile.flush()
        send(chunk(cid, created, name, {'role': 'assistant', 'content': ''}, **({'notice': notice} if notice else {})))
        _, finish, usage = self.reply(req, ids, reply_tokens,
                                      lambda piece: send(chunk(cid, created, name, {'content': piece})))
        send(chunk(cid, created, name, {}, finish, usage=usage))
        send(b'[DONE]')
        return finish, usage


class Server(ThreadingHTTPServer):
    """The HTTP server around one chat session: a thread per connection (at most MAX_CONNECTIONS), one generation at
    a time, queue_size requests waiting. name: the model's id in replies; the sampling settings: requests' defaults."""
    daemon_threads = True  # a stuck client does not keep the process alive at Ctrl+C
    request_queue_size = 64  # the listen backlog: 20 clients connecting at once all get in

    def __init__(self, address, session, name, allow_origin=(), queue_size=QUEUE_SIZE, max_new_tokens=200,
                 temperature=0.8, top_k=200, top_p=1.0):
        host = address[0]
        self.session, self.name, self.queue_size, self.page = session, name, queue_size, PAGE.read_bytes()
        self.defaults = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.lock = threading.Lock()  # the model's: one generation at a time
        self.pending, self.pending_lock = 0, threading.Lock()  # requests generating or waiting
        self.allowed_origins = {o.rstrip('/') for o in allow_origin}
        # bound to every address, a user wants to be reached by any name; else only by this machine's own names
        named = f'[{host}]' if ':' in host else host
        self.allowed_hosts = None if host in ('0.0.0.0', '::') else tuple(dict.fromkeys((*LOCAL_NAMES, named.lower())))
        self.connections, self.connections_lock = 0, threading.Lock()
        self.address_family = socket.AF_INET6 if ':' in host else socket.AF_INET  # --host=::1
        super().__init__(address, Handler)  # OSError if the address is taken or not this machine's

    @contextmanager
    def turn(self):
        """Wait for the model; ApiError(503) at once when queue_size requests are already waiting."""
        with self.pending_lock:
            if self.pending > self.queue_size:
                raise ApiError(503, f"the server is busy ({self.queue_size} requests are waiting); try again later")
            self.pending += 1
        try:
            with self.lock:
                yield
        finally:
            with self.pending_lock:
                self.pending -= 1

    def health(self):
        return {'status': 'ok', 'model': self.name, 'generating': self.lock.locked(),
                'waiting': max(0, self.pending - self.lock.locked()), 'queue_size': self.queue_size}

    def process_request(self, request, client_address):
        with self.connections_lock:
            full = self.connections >= MAX_CONNECTIONS
            self.connections += not full
        if full:
            body = json.dumps(error_body(f"the server has {MAX_CONNECTIONS} open connections; try again later"))
            try:
                request.sendall(f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections -= 1


def public_name(source):
    """The model's id in replies: a published name as given, a local model by its folder's name (never a path)."""
    path = Path(source)
    if not path.exists():
        return source
    path = path.resolve()
    return (path.parent if path.is_file() else path).name


def run_server(session, host, port, source, allow_origin=(), **defaults):
    """Serve the ChatSession until Ctrl+C; source: what the model was loaded from; defaults: Server's sampling."""
    try:
        httpd = Server((host, port), session, public_name(source), allow_origin, **defaults)
    except (OSError, OverflowError) as e:  # OverflowError: a port above 65535
        die(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); is a server already running "
            f"there? choose another --serve port")
    url = f"http://{host if ':' not in host else f'[{host}]'}:{httpd.server_address[1]}"
    print(f"serving {httpd.name} ({session.style} chat template, {session.capacity} tokens of context) at {url}/ "
          f"and {url}/v1; Ctrl+C stops", file=sys.stderr, flush=True)
    if httpd.allowed_hosts is None:
        print(f"notice: listening on {host}: anyone who reaches this port, by any name, can use the model (no "
              f"authentication)", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        httpd.server_close()
