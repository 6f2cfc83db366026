// mailroom dashboard: reads the API of the service that served it.
// Everything shown is inserted with textContent or DOM nodes, never parsed
// as HTML; the page's Content-Security-Policy forbids inline code anyway.
'use strict';

(function () {
  const TOKEN_KEY = 'mailroom.token';
  const FAILURES_SHOWN = 10;
  const PAGE_SIZE = 25;
  const REFRESH_MS = 10000;
  // An open message that is still moving is read again: soon at first
  // (most finish within a second), then less often.
  const LIVE_FIRST_MS = 250;
  const LIVE_MAX_MS = 2000;
  const MOVING = new Set(['queued', 'sending', 'retrying']);
  const CANCELLABLE = new Set(['scheduled', 'queued', 'retrying']);
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  const numbers = new Intl.NumberFormat();

  /** A refusal by the API, or no answer at all (status 0). */
  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return null;
    }
  }

  function setToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      // Storage refused (private mode): the token then lasts until reload.
    }
    memoryToken = value || null;
    $('forget-token').hidden = !value;
  }

  let memoryToken = null;

  /** What the API said, in one line: its detail when there is one. */
  function describe(status, body) {
    const detail = body && body.data && typeof body.data.error === 'string' ? body.data.error : null;
    const message = body && typeof body.message === 'string' ? body.message : null;
    const text = detail || message || 'no explanation given';
    return status ? `${status}: ${text}` : text;
  }

  async function api(path, method) {
    const headers = { Accept: 'application/json' };
    const bearer = token() || memoryToken;
    if (bearer) headers.Authorization = 'Bearer ' + bearer;
    let response;
    try {
      response = await fetch(path, { method: method || 'GET', headers, cache: 'no-store', credentials: 'omit' });
    } catch (error) {
      throw new ApiError(0, 'cannot reach the service (' + error.message + ')', null);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) throw new ApiError(response.status, describe(response.status, body), body);
    return { status: response.status, body };
  }

  // ---- small DOM helpers ------------------------------------------------

  function el(tag, options, ...children) {
    const node = document.createElement(tag);
    if (options) {
      if (options.className) node.className = options.className;
      if (options.text !== undefined && options.text !== null) node.textContent = String(options.text);
      if (options.title) node.title = options.title;
      if (options.dataset) Object.assign(node.dataset, options.dataset);
      if (options.type) node.type = options.type;
      if (options.label) node.setAttribute('aria-label', options.label);
      if (options.dateTime) node.dateTime = options.dateTime;
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function svg(tag, attributes, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function show(node, text) {
    node.textContent = text || '';
    node.hidden = !text;
  }

  function formatTime(iso) {
    if (!iso) return '–';
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
  }

  function time(iso) {
    return el('time', { text: formatTime(iso), dateTime: iso || '', title: iso || '' });
  }

  function badge(status) {
    return el('span', { className: 'badge status-' + String(status).replace(/[^a-z]/g, ''), text: status });
  }

  function setFigure(id, value) {
    const node = $(id);
    if (typeof value === 'number') {
      node.textContent = numbers.format(value);
      node.dataset.value = String(value);
      node.title = '';
      node.classList.remove('unknown');
    } else {
      node.textContent = 'unknown';
      delete node.dataset.value;
      node.title = 'this service does not report it';
      node.classList.add('unknown');
    }
  }

  /** Replaces the rows only when the data changed, so focus and the
   *  element a person is pointing at stay put across refreshes. */
  function replaceRows(tbody, key, rows) {
    if (tbody.dataset.key === key) return;
    tbody.dataset.key = key;
    tbody.replaceChildren(...rows);
  }

  function openButton(id) {
    return el('button', { type: 'button', className: 'link open', text: id, dataset: { id }, label: 'Open message ' + id });
  }

  function cell(label, ...children) {
    return el('td', { dataset: { label } }, ...children);
  }

  // ---- figures and chart ------------------------------------------------

  function renderStats(data) {
    setFigure('queue-depth', data.queue_depth);
    setFigure('retry-depth', data.retry_depth);
    setFigure('scheduled', data.scheduled);
    setFigure('webhooks-pending', typeof data.webhooks_pending === 'number' ? data.webhooks_pending : null);
    const minutes = Array.isArray(data.last_hour) ? data.last_hour : [];
    const sent = minutes.reduce((sum, minute) => sum + (minute.sent || 0), 0);
    const failed = minutes.reduce((sum, minute) => sum + (minute.failed || 0), 0);
    setFigure('sent-hour', sent);
    setFigure('failed-hour', failed);

    const relay = data.relay || {};
    const status = $('relay-status');
    status.textContent = relay.status || 'unknown';
    status.className = 'badge relay-' + (relay.status === 'ok' ? 'ok' : relay.status === 'failing' ? 'failing' : 'unknown');
    $('relay-error').textContent = relay.last_error || 'none';
    const at = $('relay-error-at');
    at.textContent = relay.last_error_at ? '(' + formatTime(relay.last_error_at) + ')' : '';
    at.dateTime = relay.last_error_at || '';

    const states = data.by_state || {};
    const kept = Object.entries(states).filter(([, count]) => count > 0);
    $('by-state').textContent = kept.length
      ? 'Statuses kept: ' + kept.map(([state, count]) => `${numbers.format(count)} ${state}`).join(' · ') + '.'
      : 'No messages yet.';
    if (typeof data.held === 'number') $('by-state').textContent += ` Unfinished, against the queue capacity: ${numbers.format(data.held)}.`;

    drawChart(minutes, sent, failed);
  }

  /** A round top for the axis whose half is a whole number too. */
  function niceMax(value) {
    if (value <= 2) return 2;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 4, 6, 8, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  let lastChart = null;

  function drawChart(minutes, sent, failed) {
    lastChart = [minutes, sent, failed];
    // Drawn at the box's own pixel width, so its text is never scaled.
    const width = Math.max(240, Math.round($('chart').clientWidth || 600));
    const height = 160;
    const left = 34;
    const right = 4;
    const top = 8;
    const bottom = 22;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const slots = Math.max(minutes.length, 60);
    const slot = plotWidth / slots;
    const peak = minutes.reduce((max, minute) => Math.max(max, (minute.sent || 0) + (minute.failed || 0)), 0);
    const scale = niceMax(peak);
    const y = (value) => top + plotHeight - (value / scale) * plotHeight;

    const chart = svg('svg', {
      viewBox: `0 0 ${width} ${height}`,
      role: 'img',
      'aria-label': `Last hour: ${sent} delivered and ${failed} failed; busiest minute ${peak}.`,
      width,
      height,
      class: 'chart-svg',
    });
    for (const fraction of [0, 0.5, 1]) {
      const value = scale * fraction;
      chart.append(
        svg('line', { x1: left, x2: width - right, y1: y(value), y2: y(value), class: 'grid' }),
        svg('text', { x: left - 4, y: y(value) + 4, 'text-anchor': 'end', class: 'axis' }, document.createTextNode(numbers.format(value))),
      );
    }
    const labels = [
      [left, 'start', '60 min ago'],
      [left + plotWidth / 2, 'middle', '30 min'],
      [width - right, 'end', 'now'],
    ];
    for (const [x, anchor, text] of labels) {
      chart.append(svg('text', { x, y: height - 6, 'text-anchor': anchor, class: 'axis' }, document.createTextNode(text)));
    }
    minutes.forEach((minute, index) => {
      const delivered = minute.sent || 0;
      const refused = minute.failed || 0;
      const x = left + index * slot + slot * 0.15;
      const barWidth = slot * 0.7;
      const group = svg('g', {
        class: 'minute',
        'data-minute': minute.minute,
        'data-sent': delivered,
        'data-failed': refused,
      });
      group.append(svg('title', {}, document.createTextNode(`${formatTime(minute.minute)}: ${delivered} delivered, ${refused} failed`)));
      // A full-height invisible target so a hover anywhere in the slot shows the title.
      group.append(svg('rect', { x: left + index * slot, y: top, width: slot, height: plotHeight, class: 'hit' }));
      if (delivered > 0) {
        group.append(svg('rect', { x, width: barWidth, y: y(delivered), height: y(0) - y(delivered), class: 'bar-sent' }));
      }
      if (refused > 0) {
        group.append(svg('rect', { x, width: barWidth, y: y(delivered + refused), height: y(delivered) - y(delivered + refused), class: 'bar-failed' }));
      }
      chart.append(group);
    });
    $('chart').replaceChildren(chart);
  }

  let drawnWidth = 0;
  new ResizeObserver((entries) => {
    const width = Math.round(entries[0].contentRect.width);
    if (lastChart && width !== drawnWidth) {
      drawnWidth = width;
      drawChart(...lastChart);
    }
  }).observe($('chart'));

  // ---- failures, search ---------------------------------------------------

  function renderFailures(messages) {
    const rows = messages.map((message) =>
      el('tr', { dataset: { id: message.id } },
        cell('Message', openButton(message.id)),
        cell('Recipients', el('span', { text: (message.recipients || []).join(', ') || '–' })),
        cell('SMTP reply', el('span', { className: 'reply', text: message.last_error || '–' })),
        cell('Attempts', el('span', { text: message.attempts })),
        cell('Failed at', time(message.updated_at)),
      ));
    replaceRows($('failures').querySelector('tbody'), JSON.stringify(messages), rows);
    $('failures').hidden = messages.length === 0;
    $('failures-empty').hidden = messages.length > 0;
  }

  function resultRow(message) {
    return el('tr', { dataset: { id: message.id } },
      cell('Message', openButton(message.id)),
      cell('Status', badge(message.status)),
      cell('Recipients', el('span', { text: (message.recipients || []).join(', ') || '–' })),
      cell('Tags', el('span', { text: (message.tags || []).join(', ') || '–' })),
      cell('Created', time(message.created_at)),
      cell('Last error', el('span', { className: 'reply', text: message.last_error || '–' })),
    );
  }

  let search = null; // { query, cursor, shown }

  function searchQuery() {
    const query = new URLSearchParams();
    for (const name of ['recipient', 'status', 'tag']) {
      const value = $('q-' + name).value.trim();
      if (value) query.set(name, value);
    }
    query.set('limit', String(PAGE_SIZE));
    return query;
  }

  async function runSearch(more) {
    const error = $('search-error');
    show(error, '');
    const id = $('q-id').value.trim();
    const tbody = $('results').querySelector('tbody');
    if (!more) {
      if (id) {
        try {
          const { body } = await api('/api/mail/' + encodeURIComponent(id));
          search = null;
          tbody.replaceChildren(resultRow(body.data));
          delete tbody.dataset.key;
          $('results').hidden = false;
          $('more').hidden = true;
          $('results-count').textContent = '1 message';
          openDetail(body.data.id, null);
        } catch (failure) {
          if (!handleAuth(failure)) {
            show(error, failure.status === 404 ? `No message with id ${id}.` : 'Search failed: ' + failure.message);
            tbody.replaceChildren();
            $('results').hidden = true;
            $('results-count').textContent = '';
          }
        }
        return;
      }
      search = { query: searchQuery(), cursor: null, shown: 0 };
      tbody.replaceChildren();
      delete tbody.dataset.key;
    }
    if (!search) return;
    const query = new URLSearchParams(search.query);
    if (search.cursor) query.set('cursor', search.cursor);
    const button = $('more');
    button.disabled = true;
    try {
      const { body } = await api('/api/mail?' + query.toString());
      const messages = body.data.messages || [];
      tbody.append(...messages.map(resultRow));
      search.shown += messages.length;
      search.cursor = body.data.next_cursor || null;
      $('results').hidden = search.shown === 0;
      button.hidden = !search.cursor;
      $('results-count').textContent = search.shown === 0
        ? 'No messages match.'
        : `${numbers.format(search.shown)} message${search.shown === 1 ? '' : 's'}${search.cursor ? ', more available' : ''}`;
    } catch (failure) {
      if (!handleAuth(failure)) show(error, 'Search failed: ' + failure.message);
    } finally {
      button.disabled = false;
    }
  }

  // ---- one message ------------------------------------------------------

  let current = null; // { id, opener, timer }

  function eventDetail(event) {
    switch (event.type) {
      case 'attempt': {
        const parts = [`attempt ${event.attempt}`];
        const code = event.smtp_code === null || event.smtp_code === undefined ? null : String(event.smtp_code);
        const reply = event.smtp_reply || '';
        if (code === null) parts.push(reply ? 'no SMTP reply: ' + reply : 'no SMTP reply');
        else parts.push(reply.startsWith(code) ? reply : `${code} ${reply}`.trim());
        if (typeof event.duration_ms === 'number') parts.push(`${event.duration_ms} ms`);
        if (event.recipients && event.recipients.length) parts.push('to ' + event.recipients.join(', '));
        return parts.join(' · ');
      }
      case 'deferred':
        return `next attempt ${formatTime(event.next_attempt_at)}` + (event.error ? ' · ' + event.error : '');
      case 'failed':
        return event.error || '';
      case 'sent':
        return event.refused && event.refused.length ? 'refused: ' + event.refused.join('; ') : '';
      case 'suppressed':
        return (event.recipients || []).join(', ');
      default:
        return Object.entries(event)
          .filter(([name]) => name !== 'type' && name !== 'at')
          .map(([name, value]) => `${name}: ${typeof value === 'object' ? JSON.stringify(value) : value}`)
          .join(' · ');
    }
  }

  function field(name, ...value) {
    return [el('dt', { text: name }), el('dd', {}, ...value)];
  }

  function renderDetail(message) {
    $('detail-id').textContent = message.id;
    const metadata = Object.entries(message.metadata || {});
    const fields = [
      ...field('Status', el('span', { className: 'badge status-' + String(message.status).replace(/[^a-z]/g, ''), text: message.status, dataset: { status: message.status } })),
      ...field('Attempts', document.createTextNode(String(message.attempts))),
      ...field('Recipients', document.createTextNode((message.recipients || []).join(', ') || '–')),
      ...field('Tags', document.createTextNode((message.tags || []).join(', ') || '–')),
      ...field('Metadata', document.createTextNode(metadata.map(([key, value]) => `${key}=${value}`).join(', ') || '–')),
      ...field('Created', time(message.created_at)),
      ...field('Updated', time(message.updated_at)),
      ...field('Next attempt', time(message.next_attempt_at)),
      ...field('Last error', el('span', { className: 'reply', text: message.last_error || '–' })),
    ];
    const list = $('detail-fields');
    list.replaceChildren(...fields);
    list.dataset.status = message.status;
    $('retry').hidden = message.status !== 'failed';
    $('cancel').hidden = !CANCELLABLE.has(message.status);
    const events = (message.events || []).map((event) =>
      el('li', { className: 'event event-' + String(event.type).replace(/[^a-z_]/g, ''), dataset: { type: event.type } },
        time(event.at),
        el('strong', { text: event.type }),
        el('span', { text: eventDetail(event) }),
      ));
    $('timeline').replaceChildren(...events);
  }

  async function loadDetail(id) {
    try {
      const { body } = await api('/api/mail/' + encodeURIComponent(id));
      if (!current || current.id !== id) return;
      show($('detail-error'), '');
      renderDetail(body.data);
      schedule(body.data.status);
    } catch (failure) {
      if (!current || current.id !== id) return;
      if (!handleAuth(failure)) show($('detail-error'), 'Cannot read this message: ' + failure.message);
    }
  }

  function schedule(status) {
    if (!current) return;
    clearTimeout(current.timer);
    if (!MOVING.has(status)) {
      current.delay = LIVE_FIRST_MS;
      return;
    }
    const id = current.id;
    current.timer = setTimeout(() => loadDetail(id), current.delay);
    current.delay = Math.min(current.delay * 2, LIVE_MAX_MS);
  }

  function openDetail(id, opener) {
    if (current) clearTimeout(current.timer);
    current = { id, opener: opener || document.activeElement, timer: null, delay: LIVE_FIRST_MS };
    $('detail-id').textContent = id;
    $('detail-fields').replaceChildren();
    delete $('detail-fields').dataset.status;
    $('timeline').replaceChildren();
    $('retry').hidden = true;
    $('cancel').hidden = true;
    show($('action-result'), '');
    show($('detail-error'), '');
    const dialog = $('detail');
    if (!dialog.open) dialog.showModal();
    $('close-detail').focus();
    loadDetail(id);
  }

  function closed() {
    if (!current) return;
    clearTimeout(current.timer);
    const opener = current.opener;
    current = null;
    // The row may have been redrawn meanwhile; fall back to its twin.
    if (opener && opener.isConnected) opener.focus();
    else if (opener && opener.dataset && opener.dataset.id) {
      const twin = document.querySelector(`button.open[data-id="${CSS.escape(opener.dataset.id)}"]`);
      if (twin) twin.focus();
    }
  }

  async function act(kind) {
    if (!current) return;
    const id = current.id;
    const button = kind === 'retry' ? $('retry') : $('cancel');
    const result = $('action-result');
    button.disabled = true;
    result.className = '';
    try {
      const path = '/api/mail/' + encodeURIComponent(id) + (kind === 'retry' ? '/retry' : '');
      const { status, body } = await api(path, kind === 'retry' ? 'POST' : 'DELETE');
      const state = body && body.data && body.data.status ? body.data.status : 'unknown';
      show(result, kind === 'retry'
        ? `Retry accepted (${status}): the message is ${state} again.`
        : `Cancelled (${status}): the message is ${state} and will not be sent.`);
      result.className = 'ok';
    } catch (failure) {
      if (handleAuth(failure)) return;
      show(result, (kind === 'retry' ? 'Retry refused (' : 'Cancel refused (') + failure.message + ')');
      result.className = 'error';
    } finally {
      button.disabled = false;
    }
    if (current && current.id === id) {
      current.delay = LIVE_FIRST_MS;
      await loadDetail(id);
    }
    refresh();
  }

  // ---- loading, the token -----------------------------------------------

  /** Shows the token form for a 401; true when it was one. */
  function handleAuth(failure) {
    if (!(failure instanceof ApiError) || failure.status !== 401) return false;
    const sent = token() || memoryToken;
    setToken(null);
    signedIn = false;
    $('dashboard').hidden = true;
    $('refresh').hidden = true;
    $('loading').hidden = true;
    show($('load-error'), '');
    if ($('detail').open) $('detail').close();
    $('login').hidden = false;
    show($('token-error'), sent ? `The service refused this token (${failure.message}). Check MAILROOM_API_TOKEN and try again.` : '');
    $('token').focus();
    return true;
  }

  let signedIn = false;

  async function refresh() {
    try {
      const [stats, failures] = await Promise.all([
        api('/api/stats'),
        api(`/api/mail?status=failed&limit=${FAILURES_SHOWN}`),
      ]);
      renderStats(stats.body.data || {});
      renderFailures((failures.body.data && failures.body.data.messages) || []);
      show($('load-error'), '');
      $('loading').hidden = true;
      $('login').hidden = true;
      $('dashboard').hidden = false;
      $('refresh').hidden = false;
      $('updated').textContent = 'Updated ' + new Date().toLocaleTimeString();
      if (!signedIn && token()) $('forget-token').hidden = false;
      signedIn = true;
      document.body.dataset.loaded = 'true';
    } catch (failure) {
      if (handleAuth(failure)) return;
      $('loading').hidden = true;
      show($('load-error'), 'Cannot load the figures: ' + failure.message);
    }
  }

  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const value = $('token').value.trim();
    if (!value) {
      show($('token-error'), 'Type the token first.');
      $('token').focus();
      return;
    }
    setToken(value);
    $('token').value = '';
    show($('token-error'), '');
    refresh();
  });

  $('forget-token').addEventListener('click', () => {
    setToken(null);
    signedIn = false;
    $('dashboard').hidden = true;
    $('refresh').hidden = true;
    $('login').hidden = false;
    show($('token-error'), '');
    $('token').focus();
  });

  $('refresh').addEventListener('click', refresh);

  $('search-form').addEventListener('submit', (event) => {
    event.preventDefault();
    runSearch(false);
  });
  $('search-form').addEventListener('reset', () => {
    search = null;
    const tbody = $('results').querySelector('tbody');
    tbody.replaceChildren();
    $('results').hidden = true;
    $('more').hidden = true;
    $('results-count').textContent = '';
    show($('search-error'), '');
  });
  $('more').addEventListener('click', () => runSearch(true));

  document.addEventListener('click', (event) => {
    const button = event.target.closest('button.open[data-id]');
    if (button) openDetail(button.dataset.id, button);
  });

  $('close-detail').addEventListener('click', () => $('detail').close());
  $('detail').addEventListener('close', closed);
  $('retry').addEventListener('click', () => act('retry'));
  $('cancel').addEventListener('click', () => act('cancel'));

  setInterval(() => {
    if (signedIn && !document.hidden) refresh();
  }, REFRESH_MS);
  document.addEventListener('visibilitychange', () => {
    if (signedIn && !document.hidden) refresh();
  });

  $('forget-token').hidden = !token();
  refresh();
})();
